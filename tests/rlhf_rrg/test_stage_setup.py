"""Stage setup: tracker settings reach the backends; a tracker that is not installed fails at parse time."""

from __future__ import annotations

import sys
import types

import pytest

from rlhf_rrg import stage_setup
from rlhf_rrg.config import ConfigError, load_config
from rlhf_rrg.stage_setup import RunConfig, setup_stage


def test_missing_tracker_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr(stage_setup, "installed", lambda package: package != "wandb")
    with pytest.raises(ConfigError, match=r"run.loggers names \['wandb'\] .*pip install wandb .*\.\[tracking\]"):
        load_config(RunConfig, None, ["--loggers", "[jsonl, wandb]"])
    with pytest.raises(ConfigError, match="unknown backend"):
        load_config(RunConfig, None, ["--loggers", "[mlflow]"])
    assert load_config(RunConfig, None, ["--loggers", "[jsonl, tensorboard]"]).loggers == ["jsonl", "tensorboard"]


def test_project_and_run_name_reach_wandb(tmp_path, monkeypatch):
    inits = []

    class FakeRun:
        id = "run-1"
        config = types.SimpleNamespace(update=lambda *args, **kwargs: None)

        def log(self, *args, **kwargs):
            pass

        def finish(self):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: inits.append(kw) or FakeRun()))
    monkeypatch.setattr(stage_setup, "installed", lambda package: True)
    run = load_config(RunConfig, None, ["--run_root", str(tmp_path / "mimic"), "--loggers", "[wandb]",
                                        "--project", "cxr"])
    setup_stage("sft", run, run).metric_logger.close()
    assert (inits[0]["project"], inits[0]["name"]) == ("cxr", "mimic-sft")
