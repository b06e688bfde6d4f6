"""DDP on 2 CPU processes with modules a configuration leaves unused: DDP aborts at its second step on any trainable
parameter without a gradient ("Expected to have finished reduction in the prior iteration"), so the stages must not
train what they do not read. SFT with retrieved context, clues and the self-refining term off trains a ViT whose
final norm then feeds nothing; SCST has no value head and, with a trainable encoder, the same unread norm."""

import pytest

from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.runroot import EXPORT_MARKER

from .conftest import PLAIN_SFT, accelerate_launch, data_args, logged, rl_args, world_size, zero_stage

pytestmark = pytest.mark.distributed


def test_two_process_sft_with_clues_and_context_off(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, SyntheticConfig(n_train=32, n_val=8, n_test=0, image_size=64, seed=0))
    run_root = tmp_path / "run"
    accelerate_launch("cpu_ddp.yaml", "sft", [*PLAIN_SFT, "--run.run_root", str(run_root), *data_args(data),
                                              "--train.max_steps", "3", "--train.batch_size", "4"])
    assert (world_size(run_root, "sft"), zero_stage(run_root, "sft")) == (2, 0)
    assert len(logged(run_root, "sft", "train/loss")) == 3
    assert (run_root / "sft" / "export" / EXPORT_MARKER).is_file()


def test_two_process_scst_with_a_trainable_encoder(plain_sft_export, tmp_path):
    data, export = plain_sft_export
    accelerate_launch("cpu_ddp.yaml", "ppo", [*rl_args("scst", data, export, tmp_path), "--freeze_vision", "false"])
    assert (world_size(tmp_path, "ppo"), zero_stage(tmp_path, "ppo")) == (2, 0)
    assert len(logged(tmp_path, "ppo", "reward/mean")) == 2
    assert (tmp_path / "ppo" / "export" / EXPORT_MARKER).is_file()
