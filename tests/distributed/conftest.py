"""Launching stages as a user would, with `accelerate launch` and 2 CPU processes, and reading back what ran."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_rrg.config import load_config
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.testing.stage_scripts import load_stage

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env() -> dict[str, str]:
    """The environment of launched stages.

    ACCELERATE_USE_CPU: without it CPU processes do not join one gloo group (see cpu_ddp.yaml). The repo root on
    PYTHONPATH: the launched script sees this checkout whatever install the venv holds. TORCH_EXTENSIONS_DIR comes
    from ``tests/conftest.py``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def accelerate_launch(config: str, stage: str, args: list[str]) -> subprocess.CompletedProcess:
    """Runs ``accelerate launch --config_file accelerate_configs/<config> stages/<stage>.py <args>`` from the repo
    root (config paths in ``args`` are relative to it); asserts it succeeded."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / config), "--main_process_port", str(free_port()),
               str(REPO / "stages" / f"{stage}.py"), *args]
    result = subprocess.run(command, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def logged(run_root: Path, stage: str, key: str) -> list:
    return [r[key] for r in read_jsonl(run_root / stage / "metrics.jsonl") if key in r]


def world_size(run_root: Path, stage: str) -> int:
    """The process count the stage itself reported (``run/num_processes``), not the one asked for."""
    (size,) = logged(run_root, stage, "run/num_processes")
    return size


def zero_stage(run_root: Path, stage: str) -> int:
    """The DeepSpeed ZeRO stage the stage itself reported (``run/zero_stage``; 0 without DeepSpeed)."""
    (value,) = logged(run_root, stage, "run/zero_stage")
    return value


def offload(run_root: Path, stage: str) -> tuple[int, int]:
    """Whether the stage ran with ZeRO's optimizer state and parameters offloaded, as it reported them
    (``run/offload_optimizer``, ``run/offload_param``: 0 or 1)."""
    (optimizer,), (param,) = (logged(run_root, stage, f"run/offload_{part}") for part in ("optimizer", "param"))
    return optimizer, param


def export_weights(run_root: Path, stage: str) -> dict:
    """Every tensor of the stage's exported model (``<stage>/export/*.safetensors``)."""
    weights: dict = {}
    for path in sorted((run_root / stage / "export").glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


def data_args(data: Path) -> list[str]:
    return ["--data.annotation_path", str(data / "annotation.json"), "--data.image_root", str(data / "images")]


# SFT on the synthetic set with every optional module off: no retrieved context, no clue head, no self-refining
# term, the plain LM loss (no unlikelihood, no finding weight); the tiny ViT trains (the debug config's
# freeze_vision: false). The LLM stays at 64 x 2, the size the fp32 tolerances of these comparisons were set on (at the
# demo's 128 x 3, one of ZeRO-3's 32768 down_proj weights differed from DDP's by 1.3e-6).
PLAIN_SFT = ["--config", "stages/configs/sft/debug.yaml", "--run.init_from", "null", "--model.vision", "tiny-vit",
             "--model.tiny_hidden_size", "64", "--model.tiny_layers", "2",
             "--prompting.context.mode", "none", "--prompting.clues.enabled", "false", "--self_refine.weight", "0",
             "--lm.unlikelihood_weight", "0", "--lm.finding_weight", "1",
             "--train.log_every", "1", "--train.eval_every", "0", "--checkpoint.save_every", "0",
             "--eval.max_samples", "2", "--eval.max_new_tokens", "4"]


# Steps of the DDP(2) SFT run that the ZeRO and checkpoint tests compare against.
SFT_STEPS = 3


def plain_sft_args(data: Path, run_root: Path, steps: int, *extra: str) -> list[str]:
    """:data:`PLAIN_SFT` for ``steps`` steps of 4 studies per process (one warmup step) on ``data``, into
    ``run_root``."""
    return [*PLAIN_SFT, "--run.run_root", str(run_root), *data_args(data), "--train.max_steps", str(steps),
            "--train.batch_size", "4", "--optim.warmup_steps", "1", *extra]


def small_sft_data(root: Path) -> Path:
    """32 synthetic training studies (8 val, no test) under ``root/data``."""
    data = root / "data"
    write_synthetic_dataset(data, SyntheticConfig(n_train=32, n_val=8, n_test=0, image_size=64, seed=0))
    return data


def close(actual: list[float], expected: list[float], rtol: float = 1e-5) -> None:
    """Logged series equal within fp32 rounding (``rtol`` looser where a fit amplifies it)."""
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=rtol, atol=1e-6)


@pytest.fixture(scope="session")
def sft_ddp(tmp_path_factory) -> tuple[Path, Path]:
    """(data, the root of a DDP(2) run of :data:`SFT_STEPS` plain SFT steps): the reference of ZeRO runs."""
    root = tmp_path_factory.mktemp("sft_ddp")
    data = small_sft_data(root)
    accelerate_launch("cpu_ddp.yaml", "sft", plain_sft_args(data, root / "ddp", SFT_STEPS))
    assert (world_size(root / "ddp", "sft"), zero_stage(root / "ddp", "sft")) == (2, 0)
    return data, root / "ddp"


@pytest.fixture(scope="session")
def plain_sft_export(tmp_path_factory) -> tuple[Path, Path]:
    """(synthetic data folder, the export of a short in-process SFT run with :data:`PLAIN_SFT`): a policy for RL."""
    root = tmp_path_factory.mktemp("plain_sft")
    data = root / "data"
    write_synthetic_dataset(data, SyntheticConfig(n_train=32, n_val=8, n_test=8, image_size=64, seed=0))
    sft = load_stage("sft")
    cfg = load_config(sft.SFTStageConfig, REPO / PLAIN_SFT[1], [
        *PLAIN_SFT[2:], "--run.run_root", str(root), *data_args(data), "--train.max_steps", "4",
        "--train.batch_size", "8"])
    sft.main(cfg)
    return data, root / "sft" / "export"


def rl_args(algo: str, data: Path, export: Path, run_root: Path) -> list[str]:
    """2 RL steps of ``algo`` (ppo, scst) from ``export``, 4 prompts per process, 8 new tokens."""
    return ["--config", f"stages/configs/ppo/{'debug_scst' if algo == 'scst' else 'debug'}.yaml",
            "--run.run_root", str(run_root), "--run.init_from", str(export), *data_args(data),
            "--train.max_steps", "2", "--train.batch_size", "4", "--generation.max_new_tokens", "8",
            "--optim.lr", "2e-4", "--eval.max_samples", "2", "--eval.max_new_tokens", "4",
            *(["--algo", "ppo", "--generation.num_samples", "1", "--ppo.minibatch_size", "2", "--ppo.ppo_epochs", "1"]
              if algo == "ppo" else ["--generation.num_samples", "2"])]
