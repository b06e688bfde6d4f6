from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from rlhf_rrg.config import ConfigError, load_config, parse_overrides, save_config


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
