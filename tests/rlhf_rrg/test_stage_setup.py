"""Stage setup: tracker settings reach the backends; a tracker that is not installed fails at parse time; a user
error ends a stage script with one line on stderr, under ``accelerate launch --quiet`` too; a finished stage
destroys its process group."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch.distributed as dist

from rlhf_rrg import stage_setup
from rlhf_rrg.config import ConfigError, load_config
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.stage_setup import RunConfig, setup_stage

REPO = Path(__file__).resolve().parents[2]


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


@pytest.fixture(scope="module")
def used_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A run root whose pretrain folder holds an earlier run, and the pretrain command line that refuses it."""
    root = tmp_path_factory.mktemp("user_error")
    write_synthetic_dataset(root / "data", SyntheticConfig(n_train=2, n_val=1, n_test=0, image_size=64, seed=0))
    (root / "run" / "pretrain").mkdir(parents=True)
    (root / "run" / "pretrain" / "metrics.jsonl").write_text("")
    return root / "run", ["stages/pretrain.py", "--config", "stages/configs/pretrain/debug.yaml",
                          "--run.run_root", str(root / "run"), "--checkpoint.resume", "false",
                          "--data.annotation_path", str(root / "data" / "annotation.json"),
                          "--data.image_root", str(root / "data" / "images")]


# Plain python keeps the stage's status 2; accelerate's launcher exits 1 for any failed child, and without --quiet
# would add its own CalledProcessError traceback (see rlhf_rrg.stage_setup).
LAUNCHERS = {"python": ([sys.executable], 2),
             "accelerate": ([sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file",
                             "accelerate_configs/cpu_debug.yaml"], 1)}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_refused_run_root_is_one_line_on_stderr(used_run, launcher):
    run_root, argv = used_run
    command, status = LAUNCHERS[launcher]
    done = subprocess.run([*command, *argv], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == status
    assert done.stderr.splitlines() == [
        f"pretrain.py: error: checkpoint.resume is false but {run_root}/pretrain holds an earlier run "
        f"({run_root}/pretrain/metrics.jsonl): pass --run.overwrite true to delete it first, or pick another "
        "run.run_root"]


def test_an_unknown_key_is_one_line_on_stderr(used_run):
    done = subprocess.run([sys.executable, *used_run[1], "--bogus.key", "1"], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "unknown config key 'bogus'" in done.stderr


def test_a_finished_stage_destroys_its_process_group(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["stage.py"])
    seen = []

    def main(cfg: RunConfig) -> None:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        seen.append(dist.get_world_size())

    stage_setup.run_stage(main, RunConfig, None)
    assert seen == [1] and not dist.is_initialized()
