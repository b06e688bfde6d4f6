import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModel

from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.models.vision import RRGVisionModel
from rlhf_rrg.runroot import EXPORT_MARKER

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_align_finishes_and_exports(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, SyntheticConfig(n_train=32, n_val=8, n_test=0, image_size=64, seed=0))
    run_root = tmp_path / "run"
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--config_file", str(REPO / "accelerate_configs" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()),
        str(REPO / "stages" / "align.py"), "--config", str(REPO / "stages" / "configs" / "align" / "debug.yaml"),
        "--run.run_root", str(run_root), "--run.init_from", "null",
        "--data.annotation_path", str(data / "annotation.json"), "--data.image_root", str(data / "images"),
        "--train.max_steps", "3", "--train.batch_size", "4", "--train.log_every", "1", "--eval.batch_size", "3",
        "--checkpoint.save_every", "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    export = run_root / "align" / "export"
    assert (export / EXPORT_MARKER).is_file()
    assert isinstance(AutoModel.from_pretrained(export / "vision"), RRGVisionModel)
    records = read_jsonl(run_root / "align" / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
    # 8 val studies over 2 processes in batches of 3 (uneven): gather_for_metrics must drop the padding.
    (final,) = [r for r in records if "eval/i2t_recall@1" in r]
    assert all(0.0 <= v <= 1.0 for k, v in final.items() if k.startswith("eval/"))
    assert all((v * 8).is_integer() for k, v in final.items() if k.startswith("eval/"))
