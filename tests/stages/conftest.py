"""Shared fixtures for stage integration tests: one small synthetic dataset per session, and stage runners."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_rrg.config import load_config
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.testing.stage_scripts import load_stage

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(out, SyntheticConfig(n_train=96, n_val=16, n_test=16, image_size=64, seed=0))
    return out


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
