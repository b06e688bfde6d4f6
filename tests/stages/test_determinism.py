"""The same seed on the same machine gives the same numbers: a short SFT run, twice, in fresh processes."""

import os
import subprocess
import sys

import pytest

from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.logging import read_jsonl

from .conftest import REPO, stage_overrides

pytestmark = pytest.mark.integration


def run_sft(data_dir, run_root, hash_seed: str) -> None:
    # Fresh processes with different string-hash seeds, two threads as the demo uses (scripts/smoke_cpu.sh):
    # set iteration order and intra-op thread splits are the usual ways a rerun drifts.
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "stages/sft.py", "--config", "stages/configs/sft/debug.yaml",
               *stage_overrides(data_dir, run_root, "--run.init_from", "null", "--train.max_steps", "3",
                                "--train.batch_size", "8", "--train.log_every", "1", "--train.eval_every", "0",
                                "--checkpoint.save_every", "0", "--eval.max_samples", "4",
                                "--eval.max_new_tokens", "8")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_sft_twice_gives_identical_metrics_and_weights(tmp_path):
    data = tmp_path / "data"  # smaller than the session set: the memory bank and retrieval are built per run
    write_synthetic_dataset(data, SyntheticConfig(n_train=24, n_val=4, n_test=0, image_size=64, seed=0))
    run_sft(data, tmp_path / "a", "1")
    run_sft(data, tmp_path / "b", "2")
    first, second = (read_jsonl(tmp_path / r / "sft" / "metrics.jsonl") for r in ("a", "b"))
    assert any("eval/ce/micro_f1_14" in r for r in first) and sum("train/loss" in r for r in first) == 3
    assert first == second  # exact: every loss, lr and generated-report metric
    export = [(tmp_path / r / "sft" / "export" / "model.safetensors").read_bytes() for r in ("a", "b")]
    assert export[0] == export[1]
