"""SFT (retrieved context, clues, self-refine) on 2 CPU processes: the world size and lr schedule it ran with."""

import pytest

from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.optim import OptimConfig, lr_factor
from rlhf_rrg.runroot import EXPORT_MARKER

from .conftest import accelerate_launch, logged, world_size

pytestmark = pytest.mark.distributed


def test_two_process_sft_follows_the_single_process_schedule(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, SyntheticConfig(n_train=32, n_val=8, n_test=0, image_size=64, seed=0))
    run_root = tmp_path / "run"
    accelerate_launch("cpu_ddp.yaml", "sft", [
        "--config", "stages/configs/sft/debug.yaml", "--run.run_root", str(run_root), "--run.init_from", "null",
        "--data.annotation_path", str(data / "annotation.json"), "--data.image_root", str(data / "images"),
        "--train.max_steps", "4", "--train.batch_size", "4", "--train.log_every", "1", "--train.eval_every", "0",
        "--optim.warmup_steps", "1", "--checkpoint.save_every", "0", "--eval.max_samples", "4",
        "--eval.max_new_tokens", "4",
    ])
    assert world_size(run_root, "sft") == 2
    cfg = OptimConfig(lr=2e-3, warmup_steps=1)  # the debug config's lr, cosine to 0 over the 4 steps
    assert logged(run_root, "sft", "train/lr") == pytest.approx([2e-3 * lr_factor(s, 4, cfg) for s in (1, 2, 3, 4)])
    assert len(logged(run_root, "sft", "train/self_refine")) == 4
    assert (run_root / "sft" / "export" / EXPORT_MARKER).is_file()
