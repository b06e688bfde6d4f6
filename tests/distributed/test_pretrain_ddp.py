"""Pretraining on 2 CPU processes follows the 1-process run: same lr schedule, same loss for the same global batch."""

import pytest
import torch

from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset

from .conftest import accelerate_launch, logged, world_size

pytestmark = pytest.mark.distributed


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, SyntheticConfig(n_train=32, n_val=0, n_test=0, image_size=64, seed=0))
    common = ["--config", "stages/configs/pretrain/debug.yaml",
              "--data.annotation_path", str(data / "annotation.json"), "--data.image_root", str(data / "images"),
              "--train.max_steps", "6", "--train.log_every", "1", "--optim.warmup_steps", "2",
              "--optim.schedule", "cosine", "--checkpoint.save_every", "0"]
    # The sampler hands rank r every other batch of the one shuffled order, so 2 x 4 is the 1 x 8 global batch.
    one, two = tmp_path / "one", tmp_path / "two"
    accelerate_launch("cpu_debug.yaml", "pretrain", [*common, "--run.run_root", str(one), "--train.batch_size", "8"])
    accelerate_launch("cpu_ddp.yaml", "pretrain", [*common, "--run.run_root", str(two), "--train.batch_size", "4"])
    assert (world_size(one, "pretrain"), world_size(two, "pretrain")) == (1, 2)
    lr_one, lr_two = logged(one, "pretrain", "train/lr"), logged(two, "pretrain", "train/lr")
    assert len(lr_one) == 6 and lr_one[-1] == 0.0 and lr_one[0] > lr_one[2]  # warmup, decay to 0: a real schedule
    assert lr_two == pytest.approx(lr_one, rel=1e-12)
    loss_one, loss_two = logged(one, "pretrain", "train/loss"), logged(two, "pretrain", "train/loss")
    torch.testing.assert_close(torch.tensor(loss_two), torch.tensor(loss_one), rtol=1e-4, atol=1e-6)
