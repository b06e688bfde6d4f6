"""Align (CLIP-style, with its learnable logit scale) under DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 with optimizer state
and parameters offloaded, on 2 CPU processes: the same losses, logit scales, retrieval scores and exports (both towers
and the heads) as DDP(2) at the same global batch.

The logit scale starts at its upper clamp, where the first step pushes it past: ZeRO's optimizer steps an fp32 master
copy, which the clamp must reach too, or from the next step on the runs part. It is a shape-(1,) parameter, which
DeepSpeed can broadcast at ``accelerator.prepare`` (a 0-dim one failed there); exports keep it 0-dim."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.logging import read_jsonl

from .conftest import accelerate_launch, data_args, logged, offload, world_size, zero_stage

pytestmark = pytest.mark.distributed

STEPS = 3


def align_args(data: Path, run_root: Path) -> list[str]:
    return ["--config", "stages/configs/align/debug.yaml", "--run.init_from", "null", *data_args(data),
            "--run.run_root", str(run_root), "--train.max_steps", str(STEPS), "--train.batch_size", "4",
            "--train.log_every", "1", "--eval.batch_size", "4", "--optim.lr", "4e-3", "--optim.warmup_steps", "1",
            "--checkpoint.save_every", "0", "--contrastive.init_temperature", "0.5",
            "--contrastive.max_logit_scale", "2"]


def exported(run_root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the align export (``vision/``, ``text/``, ``heads.safetensors``), keyed by file and name."""
    export = run_root / "align" / "export"
    return {f"{path.relative_to(export)}:{name}": tensor for path in sorted(export.rglob("*.safetensors"))
            for name, tensor in load_file(path).items()}


@pytest.fixture(scope="module")
def align_ddp(tmp_path_factory) -> tuple[Path, Path]:
    """(data, the root of the DDP(2) reference run)."""
    root = tmp_path_factory.mktemp("align_ddp")
    data = root / "data"
    write_synthetic_dataset(data, SyntheticConfig(n_train=32, n_val=8, n_test=0, image_size=64, seed=0))
    accelerate_launch("cpu_ddp.yaml", "align", align_args(data, root / "ddp"))
    assert (world_size(root / "ddp", "align"), zero_stage(root / "ddp", "align")) == (2, 0)
    # The clamp held the scale after the first step: the runs below exercise it.
    assert logged(root / "ddp", "align", "train/logit_scale")[:2] == [2.0, 2.0]
    return data, root / "ddp"


@pytest.mark.parametrize(("config", "stage", "offloaded"),
                         [("zero2_cpu.yaml", 2, 0), ("zero3_cpu.yaml", 3, 0), ("zero3_offload_cpu.yaml", 3, 1)],
                         ids=["zero2", "zero3", "zero3_offload"])
def test_align_under_zero_matches_ddp(align_ddp, tmp_path, config, stage, offloaded):
    data, ddp = align_ddp
    accelerate_launch(config, "align", align_args(data, tmp_path))
    assert (world_size(tmp_path, "align"), zero_stage(tmp_path, "align")) == (2, stage)
    assert offload(tmp_path, "align") == (offloaded, offloaded)
    for key in ("train/loss", "train/logit_scale"):
        assert len(logged(tmp_path, "align", key)) == STEPS
        torch.testing.assert_close(torch.tensor(logged(tmp_path, "align", key)),
                                   torch.tensor(logged(ddp, "align", key)), rtol=1e-5, atol=1e-6, msg=key)
    # Retrieval over the val split (ZeRO-3: each process embeds its share with the gathered model).
    (ours,), (reference,) = ([r for r in read_jsonl(run / "align" / "metrics.jsonl") if "eval/i2t_recall@1" in r]
                             for run in (tmp_path, ddp))
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        if key.startswith("eval/"):
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    ours, reference = exported(tmp_path), exported(ddp)
    assert ours.keys() == reference.keys() and ours["heads.safetensors:loss.logit_scale"].dim() == 0
    for name, tensor in reference.items():
        assert ours[name].shape == tensor.shape, name  # ZeRO-3: gathered, not a partition
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=2e-5, msg=name)
