from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from rlhf_rrg.config import ConfigError, load_config, parse_overrides, parse_stage_args, save_config
from rlhf_rrg.runroot import EXPORT_MARKER


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


@dataclass
class Root:
    name: str = "run"
    steps: int = 10
    algo: Literal["ppo", "scst"] = "ppo"
    init: str | None = None
    optim: Optim = field(default_factory=Optim)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "steps: 5\noptim:\n  lr: 1\n")
    cfg = load_config(Root, path, ["--optim.betas", "[0.8, 0.9]", "--algo=scst"])
    assert cfg.steps == 5
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.algo == "scst"


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml.*unknown config key 'optim.lrr'"):
        load_config(Root, path)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        load_config(Root, None, ["--stepz", "3"])


def test_wrong_type_and_literal():
    with pytest.raises(ConfigError, match="steps: expected int"):
        load_config(Root, None, ["--steps", "many"])
    with pytest.raises(ConfigError, match="algo: 'dpo' is not one of"):
        load_config(Root, None, ["--algo", "dpo"])


def test_post_init_validation_is_reported():
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        load_config(Root, None, ["--optim.lr", "-1"])


def test_missing_file_and_override_without_value(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Root, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--steps"])


def test_save_round_trip(tmp_path):
    cfg = load_config(Root, None, ["--init", "x", "--optim.lr", "0.5"])
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(Root, tmp_path / "out.yaml") == cfg


def test_float_written_without_dot():
    assert load_config(Root, None, ["--optim.lr", "3e-3"]).optim.lr == 3e-3


@dataclass
class Run:
    run_root: str = field(default="runs/demo", metadata={"help": "root of the run"})
    init_from: str | None = field(default=None, metadata={"help": "stage or folder"})


@dataclass
class Data:
    annotation_path: Path = field(default=Path("data/a.json"), metadata={"help": "the annotation"})
    image_root: Path = field(default=Path("data/images"), metadata={"help": "image folder"})


@dataclass
class SftStageConfig:
    run: Run = field(default_factory=lambda: Run(init_from="align"))
    data: Data = field(default_factory=Data)
    optim: Optim = field(default_factory=Optim)
    algo: Literal["ppo", "scst"] = field(default="ppo", metadata={"help": "the algorithm"})


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An RRG_HOME with the data files and a finished align export under runs/demo."""
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "a.json").write_text("{}")
    export = tmp_path / "runs" / "demo" / "align" / "export"
    export.mkdir(parents=True)
    (export / EXPORT_MARKER).write_text("{}")
    monkeypatch.setenv("RRG_HOME", str(tmp_path))
    return tmp_path


def test_help_lists_every_key_with_type_default_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_stage_args(SftStageConfig, "the stage", ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert '--run.init_from str | null (default: "align")\n      stage or folder' in out
    assert '--data.annotation_path Path (default: "data/a.json")\n      the annotation' in out
    assert "--optim.betas tuple[float, float] (default: [0.9, 0.999])" in out
    assert '--algo {ppo,scst} (default: "ppo")\n      the algorithm' in out
    assert "--print-config" in out and "$RRG_HOME" in out


def test_print_config_shows_the_resolved_config_and_exits(home, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_stage_args(SftStageConfig, None, ["--print-config", "--optim.lr", "0.5", "--run.run_root", "mine"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.5
    # Defaults and YAML values live under RRG_HOME; command-line paths are the user's own (cwd-relative).
    assert printed["run"]["run_root"] == "mine"
    assert printed["data"]["annotation_path"] == str(home / "data" / "a.json")


def test_stage_defaults_continue_under_rrg_home(home):
    cfg = parse_stage_args(SftStageConfig, None, [])
    assert cfg.run.run_root == str(home / "runs" / "demo")
    assert cfg.data.image_root == home / "data" / "images"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optim.lrr", "1"], "unknown config key 'optim.lrr'"),
        (["--config", "nope.yaml"], "config file not found: nope.yaml"),
        (["--data.annotation_path", "/nowhere.json"], "data.annotation_path: /nowhere.json is not an existing file"),
        (["--run.init_from", "pretrain"], "has no complete export"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(home, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        parse_stage_args(SftStageConfig, None, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and ": error: " in err
