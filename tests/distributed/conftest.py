"""Launching stages as a user would, with `accelerate launch` and 2 CPU processes, and reading back what ran."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from rlhf_rrg.logging import read_jsonl

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(config: str, stage: str, args: list[str]) -> subprocess.CompletedProcess:
    """Runs ``accelerate launch --config_file accelerate_configs/<config> stages/<stage>.py <args>`` from the repo
    root (config paths in ``args`` are relative to it); asserts it succeeded."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / config), "--main_process_port", str(free_port()),
               str(REPO / "stages" / f"{stage}.py"), *args]
    # ACCELERATE_USE_CPU: without it CPU processes do not join one gloo group (see cpu_ddp.yaml). The repo root on
    # PYTHONPATH: the launched script sees this checkout whatever install the venv holds.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def logged(run_root: Path, stage: str, key: str) -> list:
    return [r[key] for r in read_jsonl(run_root / stage / "metrics.jsonl") if key in r]


def world_size(run_root: Path, stage: str) -> int:
    """The process count the stage itself reported (``run/num_processes``), not the one asked for."""
    (size,) = logged(run_root, stage, "run/num_processes")
    return size
