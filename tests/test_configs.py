"""Every stage config parses into its stage's dataclasses; unknown keys and unknown rewards are errors."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from rewards.composite import build_reward
from rlhf_rrg.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "stages" / "configs").glob("**/*.yaml"))


@functools.cache
def stage_config_class(stage: str) -> type:
    """The ``*StageConfig`` dataclass of ``stages/<stage>.py``, imported as the stage tests do (not a package)."""
    spec = importlib.util.spec_from_file_location(f"stage_{stage}", REPO / "stages" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return next(v for k, v in vars(module).items() if k.endswith("StageConfig"))


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
