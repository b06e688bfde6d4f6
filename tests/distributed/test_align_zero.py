"""Align (CLIP-style, with its learnable logit scale) under DeepSpeed ZeRO-2 on 2 CPU processes: the same losses
and exported heads as DDP(2). The logit scale is a shape-(1,) parameter, which DeepSpeed can broadcast at
``accelerator.prepare`` (a 0-dim one failed there); exports keep it 0-dim."""

import pytest
import torch
from safetensors.torch import load_file

from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset

from .conftest import accelerate_launch, logged, world_size, zero_stage

pytestmark = pytest.mark.distributed


def test_align_under_zero2_matches_ddp(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, SyntheticConfig(n_train=32, n_val=8, n_test=0, image_size=64, seed=0))
    args = ["--config", "stages/configs/align/debug.yaml", "--run.init_from", "null",
            "--data.annotation_path", str(data / "annotation.json"), "--data.image_root", str(data / "images"),
            "--train.max_steps", "3", "--train.batch_size", "4", "--train.log_every", "1", "--eval.batch_size", "4",
            "--optim.lr", "4e-3", "--optim.warmup_steps", "1", "--checkpoint.save_every", "0"]
    ddp, zero = tmp_path / "ddp", tmp_path / "zero2"
    accelerate_launch("cpu_ddp.yaml", "align", [*args, "--run.run_root", str(ddp)])
    accelerate_launch("zero2_cpu.yaml", "align", [*args, "--run.run_root", str(zero)])
    assert (world_size(zero, "align"), zero_stage(zero, "align")) == (2, 2)
    for key in ("train/loss", "train/logit_scale"):
        assert len(logged(zero, "align", key)) == 3
        torch.testing.assert_close(torch.tensor(logged(zero, "align", key)), torch.tensor(logged(ddp, "align", key)),
                                   rtol=1e-5, atol=1e-6)
    ours, reference = (load_file(run / "align" / "export" / "heads.safetensors") for run in (zero, ddp))
    assert ours.keys() == reference.keys() and ours["loss.logit_scale"].dim() == 0
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=2e-5, msg=name)
