import pytest
import torch
from safetensors.torch import load_file

from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.runroot import MissingStageOutputError
from rlhf_rrg.training import NonFiniteLossError

from .conftest import run_stage

pytestmark = pytest.mark.integration

STEPS = ["--train.max_steps", "8", "--train.batch_size", "8", "--train.log_every", "1"]


def losses(run_root):
    return [r["train/loss"] for r in read_jsonl(run_root / "pretrain" / "metrics.jsonl") if "train/loss" in r]


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
