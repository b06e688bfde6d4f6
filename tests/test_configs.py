"""Every stage config parses into its stage's dataclasses; unknown keys and unknown rewards are errors."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from rewards.composite import build_reward
from rlhf_rrg.config import ConfigError, load_config, parse_stage_args
from rlhf_rrg.runroot import EXPORT_MARKER, resolve_init
from rlhf_rrg.testing.stage_scripts import stage_config_class

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "stages" / "configs").glob("**/*.yaml"))


def config_id(path: Path) -> str:
    return str(path.relative_to(REPO / "stages" / "configs"))


def test_every_stage_has_a_debug_config():
    stages = {p.stem for p in (REPO / "stages").glob("*.py")}
    assert {"pretrain", "sft"} <= stages
    for stage in stages:
        assert (REPO / "stages" / "configs" / stage / "debug.yaml").is_file(), f"stages/{stage}.py has no debug.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_config_parses_into_its_stage_dataclass(path):
    stage = path.parent.name
    assert (REPO / "stages" / f"{stage}.py").is_file(), f"{config_id(path)}: there is no stages/{stage}.py"
    cls = stage_config_class(stage)
    cfg = load_config(cls, path)
    assert isinstance(cfg, cls)
    # Rewards are resolved by name before a long run, not at its first rollout.
    funcs = getattr(getattr(cfg, "reward", None), "funcs", None)
    for name in funcs or ():
        assert callable(build_reward(name)), f"{config_id(path)}: reward {name!r}"


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_unknown_keys_are_rejected(path, tmp_path):
    cls = stage_config_class(path.parent.name)
    data = yaml.safe_load(path.read_text())
    section = next(k for k, v in data.items() if isinstance(v, dict))
    data[section]["not_a_key"] = 1
    typo = tmp_path / path.name
    typo.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=rf"unknown config key '{section}\.not_a_key'"):
        load_config(cls, typo)
    with pytest.raises(ConfigError, match=r"unknown config key 'nowhere'"):
        load_config(cls, path, ["--nowhere.x", "1"])


@pytest.mark.parametrize("dataset", ["iu_xray", "mimic_cxr", "chexpert_plus"])
def test_every_stage_of_a_dataset_uses_the_pretrain_image_size(dataset):
    # Each stage starts from the previous stage's export and checks its image size at start.
    sizes = {stage: yaml.safe_load((REPO / "stages" / "configs" / stage / f"{dataset}.yaml").read_text())["data"]
             ["image_size"] for stage in ("pretrain", "align", "sft", "ppo")}
    assert set(sizes.values()) == {sizes["pretrain"]}, sizes


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        keys += leaf_keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [f"{prefix}{f.name}"]
    return keys


@pytest.mark.parametrize("stage", ["pretrain", "align", "sft", "ppo"])
def test_stage_help_lists_every_key(stage, capsys):
    cls = stage_config_class(stage)
    with pytest.raises(SystemExit):
        parse_stage_args(cls, None, ["--help"])
    listed = re.findall(r"^  --(\S+) ", capsys.readouterr().out, flags=re.M)
    assert listed == ["config", "print-config", *leaf_keys(cls)]


@pytest.fixture
def demo_home(tmp_path, monkeypatch):
    """What scripts/smoke_cpu.sh leaves under RRG_HOME: the synthetic data and the demo run's SFT export."""
    (tmp_path / "data" / "synthetic" / "images").mkdir(parents=True)
    (tmp_path / "data" / "synthetic" / "annotation.json").write_text("{}")
    export = tmp_path / "runs" / "demo" / "sft" / "export"
    export.mkdir(parents=True)
    (export / EXPORT_MARKER).write_text('{"stage": "sft"}')
    monkeypatch.setenv("RRG_HOME", str(tmp_path))
    return tmp_path


def test_ppo_without_arguments_continues_from_the_demo(demo_home):
    cfg = parse_stage_args(stage_config_class("ppo"), None, [])
    assert resolve_init(cfg.run.run_root, "ppo", cfg.run.init_from) == demo_home / "runs" / "demo" / "sft" / "export"
    assert cfg.data.annotation_path == demo_home / "data" / "synthetic" / "annotation.json"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "stages/configs/sft/iu_xray.yaml", "--data.annotation_path",
          "{home}/data/synthetic/annotation.json", "--data.image_root", "{home}/data/synthetic/images"],
         "model.llm_path: MUST_BE_SET is not a folder with config.json"),
        (["--model.vision", "vim-huge"], "vision 'vim-huge' is neither one of ['tiny-arm', "),
        (["--run.init_from", "align", "--run.run_root", "{home}/runs/other"], "run stages/align.py with the same"),
    ],
)
def test_sft_user_errors_exit_2_before_any_model(demo_home, capsys, argv, message):
    argv = [a.format(home=demo_home) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        parse_stage_args(stage_config_class("sft"), None, [str(REPO / a) if a.endswith(".yaml") else a for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_align_placeholder_text_encoder_is_named(demo_home, capsys):
    data = ["--data.annotation_path", str(demo_home / "data/synthetic/annotation.json"),
            "--data.image_root", str(demo_home / "data/synthetic/images")]
    with pytest.raises(SystemExit) as exit_:
        parse_stage_args(stage_config_class("align"), None,
                         ["--config", str(REPO / "stages/configs/align/iu_xray.yaml"), *data])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "text.path: /path/to/BiomedVLP-CXR-BERT-general is not a folder" in err
