"""Shared fixtures for stage integration tests: one small synthetic dataset per session, and stage runners."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from rlhf_rrg.config import load_config
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(out, SyntheticConfig(n_train=96, n_val=16, n_test=16, image_size=64, seed=0))
    return out


def load_stage(name: str):
    """Imports ``stages/<name>.py`` as a module (stages are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def stage_overrides(data_dir: Path, run_root: Path, *extra: str) -> list[str]:
    return ["--run.run_root", str(run_root), "--data.annotation_path", str(data_dir / "annotation.json"),
            "--data.image_root", str(data_dir / "images"), *extra]


def run_stage(name: str, data_dir: Path, run_root: Path, *extra: str):
    """Runs a stage's ``main`` in-process on its debug config with the given overrides; returns the config."""
    module = load_stage(name)
    config_cls = next(v for k, v in vars(module).items() if k.endswith("StageConfig"))
    cfg = load_config(config_cls, REPO / "stages" / "configs" / name / "debug.yaml",
                      stage_overrides(data_dir, run_root, *extra))
    module.main(cfg)
    return cfg
