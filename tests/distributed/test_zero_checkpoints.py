"""Checkpoints under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes: a run that ends after a step (with a
checkpoint, ``--train.stop_at_step``) or is SIGKILLed resumes exactly (its later losses equal an uninterrupted
run's), manifests cover DeepSpeed's sharded layout, a damaged shard makes the resume fall back to the newest intact
checkpoint, and the export of the resumed run is the whole model, equal to an uninterrupted DDP(2) run's."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rlhf_rrg.checkpoint import MANIFEST, step_dirs

from .conftest import (
    REPO,
    SFT_STEPS,
    accelerate_launch,
    close,
    export_weights,
    free_port,
    launch_env,
    logged,
    plain_sft_args,
)

pytestmark = pytest.mark.distributed



def assert_same_run(run_root, reference, stage: int) -> None:
    """``run_root``'s SFT logged ``reference``'s losses step for step and exported the same (whole) weights."""
    # Each launch logs the world size and ZeRO stage it ran with (the resume's at the step it resumed from).
    launches = list(zip(logged(run_root, "sft", "run/num_processes"), logged(run_root, "sft", "run/zero_stage"),
                        strict=True))
    assert len(launches) == 2 and set(launches) == {(2, stage)}, launches
    losses = logged(run_root, "sft", "train/loss")
    assert len(losses) == SFT_STEPS
    close(losses, logged(reference, "sft", "train/loss"))
    ours, theirs = export_weights(run_root, "sft"), export_weights(reference, "sft")
    assert ours.keys() == theirs.keys() and theirs
    for name, tensor in theirs.items():
        assert ours[name].shape == tensor.shape, name  # ZeRO-3: gathered, not a partition
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=2e-5, msg=name)


def sharded_files(checkpoint) -> list[str]:
    """The files of DeepSpeed's checkpoint layout (``<tag>/*_model_states.pt``, ``*_optim_states.pt``) that
    the manifest lists."""
    files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    return sorted(name for name in files if name.endswith("_states.pt"))


# ZeRO-2 here; ZeRO-3's stop, manifest and resume are the damaged-shard test's (it resumes from the step before).
def test_stop_and_resume_under_zero2_equals_a_straight_run(sft_ddp, tmp_path):
    data, ddp = sft_ddp
    stop_at_2 = plain_sft_args(data, tmp_path, SFT_STEPS, "--checkpoint.save_every", "1", "--train.stop_at_step", "2")
    accelerate_launch("zero2_cpu.yaml", "sft", stop_at_2)
    (checkpoint, *_) = reversed(step_dirs(tmp_path / "sft" / "checkpoints"))
    assert checkpoint.name == "step_000002"
    shards = sharded_files(checkpoint)
    # Both processes' optimizer-state partitions are in the manifest.
    assert sum("optim_states" in name for name in shards) == 2, shards
    accelerate_launch("zero2_cpu.yaml", "sft",
                      plain_sft_args(data, tmp_path, SFT_STEPS, "--checkpoint.save_every", "1"))
    assert_same_run(tmp_path, ddp, 2)


def test_a_damaged_zero3_shard_falls_back_to_the_previous_checkpoint(sft_ddp, tmp_path):
    data, ddp = sft_ddp
    stop_at_2 = plain_sft_args(data, tmp_path, SFT_STEPS, "--checkpoint.save_every", "1", "--train.stop_at_step", "2")
    accelerate_launch("zero3_cpu.yaml", "sft", stop_at_2)
    checkpoints = tmp_path / "sft" / "checkpoints"
    newest = checkpoints / "step_000002"
    shards = sharded_files(newest)
    # Both processes' optimizer-state and parameter partitions are in the manifest.
    assert [sum(kind in name for name in shards) for kind in ("optim_states", "model_states")] == [2, 2], shards
    # Rank 1's optimizer partition: only the manifest can tell that it is damaged (DeepSpeed would load it).
    (shard,) = [name for name in shards if "zero_pp_rank_1_" in name and "optim_states" in name]
    with (newest / shard).open("r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\0" * 8)
    accelerate_launch("zero3_cpu.yaml", "sft",
                      plain_sft_args(data, tmp_path, SFT_STEPS, "--checkpoint.save_every", "1"))
    assert (checkpoints / "invalid_step_000002").is_dir()
    assert_same_run(tmp_path, ddp, 3)


def test_sigkill_under_zero3_resumes_exactly(sft_ddp, tmp_path):
    # Killed while training (at whatever point the second checkpoint is being or has been written): the resume
    # starts from the newest intact checkpoint and the run ends as if never stopped.
    data, ddp = sft_ddp
    args = plain_sft_args(data, tmp_path, SFT_STEPS, "--checkpoint.save_every", "1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / "zero3_cpu.yaml"), "--main_process_port", str(free_port()),
               str(REPO / "stages" / "sft.py"), *args]
    env = launch_env()
    checkpoints = tmp_path / "sft" / "checkpoints"
    launch = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (checkpoints / "step_000001").is_dir():
            assert launch.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(launch.pid, signal.SIGKILL)  # the launcher and both ranks, as a scheduler's kill would
        launch.wait()
    assert not (tmp_path / "sft" / "export").exists()
    accelerate_launch("zero3_cpu.yaml", "sft", args)
    assert_same_run(tmp_path, ddp, 3)
