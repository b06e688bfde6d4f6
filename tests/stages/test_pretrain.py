import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf_rrg.checkpoint import latest_step
from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.numerics import numerics_line
from rlhf_rrg.runlock import RunLockedError
from rlhf_rrg.runroot import MissingStageOutputError
from rlhf_rrg.stage_setup import StageFolderError
from rlhf_rrg.training import NonFiniteLossError

from .conftest import REPO, run_stage, stage_overrides

pytestmark = pytest.mark.integration

STEPS = ["--train.max_steps", "8", "--train.batch_size", "8", "--train.log_every", "1"]


def losses(run_root):
    return [r["train/loss"] for r in read_jsonl(run_root / "pretrain" / "metrics.jsonl") if "train/loss" in r]


def logged_steps(run_root):
    return [r["step"] for r in read_jsonl(run_root / "pretrain" / "metrics.jsonl") if "train/loss" in r]


def test_loss_falls_and_encoder_is_exported(synthetic_data, tmp_path):
    run_stage("pretrain", synthetic_data, tmp_path, *STEPS, "--train.max_steps", "30", "--optim.lr", "3e-3")
    curve = losses(tmp_path)
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5
    exported = load_file(tmp_path / "pretrain" / "export" / "model.safetensors")
    checkpoint = load_file(next((tmp_path / "pretrain" / "checkpoints").glob("step_*")) / "model.safetensors")
    # The exported encoder is the trained one, not its initialisation.
    for name, value in exported.items():
        torch.testing.assert_close(value, checkpoint[f"vision_model.{name}"])
    # What decided its floating-point results is on record (this process ran it, so the same line).
    logged = [r["run/numerics"] for r in read_jsonl(tmp_path / "pretrain" / "metrics.jsonl") if "run/numerics" in r]
    assert logged == [numerics_line()]


def test_resume_continues_exactly(synthetic_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_stage("pretrain", synthetic_data, straight, *STEPS)
    run_stage("pretrain", synthetic_data, resumed, *STEPS, "--train.stop_at_step", "5")
    run_stage("pretrain", synthetic_data, resumed, *STEPS)
    torch.testing.assert_close(losses(resumed), losses(straight), rtol=1e-5, atol=1e-6)


def test_nonfinite_loss_stops_with_saved_state(synthetic_data, tmp_path):
    with pytest.raises(NonFiniteLossError, match="state saved to"):
        run_stage("pretrain", synthetic_data, tmp_path, *STEPS, "--optim.lr", "1e30", "--optim.grad_clip", "0")
    assert list((tmp_path / "pretrain" / "checkpoints").glob("failed_step_*"))


def test_missing_init_export_is_named(synthetic_data, tmp_path):
    with pytest.raises(MissingStageOutputError, match="align"):
        run_stage("pretrain", synthetic_data, tmp_path, *STEPS, "--run.init_from", "align")


def test_resume_skips_a_damaged_checkpoint_and_stays_exact(synthetic_data, tmp_path, caplog):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_stage("pretrain", synthetic_data, straight, *STEPS)
    run_stage("pretrain", synthetic_data, resumed, *STEPS, "--checkpoint.save_every", "2", "--train.stop_at_step", "6")
    rng = resumed / "pretrain" / "checkpoints" / "step_000006" / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:100])  # silently ignored before checkpoints had manifests
    run_stage("pretrain", synthetic_data, resumed, *STEPS, "--checkpoint.save_every", "2")
    assert "skipping damaged checkpoint" in caplog.text and "random_states_0.pkl" in caplog.text
    assert logged_steps(resumed) == list(range(1, 9))
    torch.testing.assert_close(losses(resumed), losses(straight), rtol=1e-5, atol=1e-6)


def test_resume_false_on_a_used_run_root_needs_overwrite(synthetic_data, tmp_path):
    run_stage("pretrain", synthetic_data, tmp_path, *STEPS)
    with pytest.raises(StageFolderError, match=r"checkpoint.resume is false but .*pretrain holds an earlier run.*"
                                               r"--run.overwrite true"):
        run_stage("pretrain", synthetic_data, tmp_path, *STEPS, "--checkpoint.resume", "false", "--run.seed", "1")
    run_stage("pretrain", synthetic_data, tmp_path, *STEPS, "--checkpoint.resume", "false", "--run.seed", "1",
              "--run.overwrite", "true", "--train.max_steps", "4")
    stage = tmp_path / "pretrain"
    assert logged_steps(tmp_path) == [1, 2, 3, 4]
    assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == ["step_000004"]
    assert yaml.safe_load((stage / "config.yaml").read_text())["run"]["seed"] == 1


def test_resume_with_a_changed_learning_rate_is_refused(synthetic_data, tmp_path):
    run_stage("pretrain", synthetic_data, tmp_path, *STEPS, "--train.stop_at_step", "2")
    with pytest.raises(StageFolderError, match=r"refusing to resume with changed optimiser settings \(optim.lr: "
                                               r"0.001 -> 0.005\).*--run.overwrite true"):
        run_stage("pretrain", synthetic_data, tmp_path, *STEPS, "--optim.lr", "5e-3")
    assert yaml.safe_load((tmp_path / "pretrain" / "config.yaml").read_text())["optim"]["lr"] == 1e-3


def test_a_live_run_locks_the_stage_and_its_sigkill_frees_it(synthetic_data, tmp_path, caplog):
    long_run = [*STEPS, "--train.max_steps", "100000", "--checkpoint.save_every", "2"]
    command = [sys.executable, str(REPO / "stages" / "pretrain.py"), "--config",
               str(REPO / "stages" / "configs" / "pretrain" / "debug.yaml"),
               *stage_overrides(synthetic_data, tmp_path, *long_run)]
    first = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "pretrain" / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        while latest_step(checkpoints) is None and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert latest_step(checkpoints) is not None, "the first run never saved a checkpoint"
        with pytest.raises(RunLockedError, match=rf"pretrain is in use by pid {first.pid} on host"):
            run_stage("pretrain", synthetic_data, tmp_path, *long_run)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resume_from = latest_step(checkpoints)
    run_stage("pretrain", synthetic_data, tmp_path, *long_run, "--train.stop_at_step", str(resume_from + 1))
    assert f"taking over a stale lock (pid {first.pid}" in caplog.text
    # The killed run's records after its checkpoint are dropped: one uninterrupted series.
    assert logged_steps(tmp_path) == list(range(1, resume_from + 2))
