"""``accelerate launch stages/ppo.py``: one process, 2-process DDP on CPU, and DeepSpeed ZeRO-2 (one CPU process)."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_rrg.config import load_config
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.logging import read_jsonl

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def data_and_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_launch")
    data = root / "data"
    write_synthetic_dataset(data, SyntheticConfig(n_train=32, n_val=8, n_test=8, image_size=64, seed=0))
    spec = importlib.util.spec_from_file_location("stage_sft_for_launch", REPO / "stages" / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sft  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(sft)
    cfg = load_config(sft.SFTStageConfig, REPO / "stages" / "configs" / "sft" / "debug.yaml", [
        "--run.run_root", str(root), "--run.init_from", "null",
        "--data.annotation_path", str(data / "annotation.json"),
        "--data.image_root", str(data / "images"), "--model.vision", "tiny-vit", "--prompting.context.mode", "none",
        "--prompting.clues.enabled", "false", "--self_refine.weight", "0", "--train.max_steps", "10",
        "--train.batch_size", "8", "--train.eval_every", "0", "--checkpoint.save_every", "0",
        "--eval.max_samples", "2", "--eval.max_new_tokens", "4"])
    sft.main(cfg)
    return data, root / "sft" / "export"


@pytest.mark.parametrize("launch", [
    ["--config_file", "accelerate_configs/cpu_debug.yaml"],
    ["--config_file", "accelerate_configs/cpu_ddp.yaml"],
    ["--config_file", "accelerate_configs/zero2_cpu.yaml"],
], ids=["single", "ddp2", "zero2"])
def test_accelerate_launch_runs_ppo(data_and_export, tmp_path, launch):
    data, export = data_and_export
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", str(free_port()),
        "stages/ppo.py", "--config", "stages/configs/ppo/debug.yaml", "--run.run_root", str(tmp_path),
        "--run.init_from", str(export), "--data.annotation_path", str(data / "annotation.json"),
        "--data.image_root", str(data / "images"), "--train.max_steps", "2", "--train.batch_size", "4",
        "--ppo.minibatch_size", "2", "--ppo.ppo_epochs", "1", "--generation.max_new_tokens", "8",
        "--eval.max_samples", "2", "--eval.max_new_tokens", "4",
    ]
    # The repo root on PYTHONPATH: the launched script sees this checkout whatever install the venv holds.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ppo: reward" in result.stdout
    rewards = [r["reward/mean"] for r in read_jsonl(tmp_path / "ppo" / "metrics.jsonl") if "reward/mean" in r]
    assert len(rewards) == 2
    assert (tmp_path / "ppo" / "export" / "export_complete.json").is_file()
    assert (tmp_path / "ppo" / "checkpoints" / "step_000002").is_dir()
