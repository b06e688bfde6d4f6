import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_rrg.logging import JsonlLogger, MultiLogger, NullLogger, build_loggers, read_jsonl


def test_jsonl_writes_one_record_per_step_with_converted_scalars(tmp_path):
    log = JsonlLogger(tmp_path / "run" / "metrics.jsonl")
    log.log_dict({"train/loss": torch.tensor(0.5), "reward/total": np.float32(1.25), "perf/n": 3}, step=1)
    log.log_dict({"train/loss": 0.25, "note": "ok", "flag": True}, step=2)
    # flushed per record: readable before close
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == [
        {"step": 1, "train/loss": 0.5, "reward/total": 1.25, "perf/n": 3},
        {"step": 2, "train/loss": 0.25, "note": "ok", "flag": True},
    ]
    log.close()


def test_jsonl_rejects_non_scalars_and_step_key(tmp_path):
    log = JsonlLogger(tmp_path / "metrics.jsonl")
    with pytest.raises(TypeError, match="metric 'train/x': expected a scalar, got a tensor of shape \\(2,\\)"):
        log.log_dict({"train/x": torch.zeros(2)}, step=0)
    with pytest.raises(TypeError, match="metric 'train/y'"):
        log.log_dict({"train/y": [1, 2]}, step=0)
    with pytest.raises(ValueError, match="must not contain 'step'"):
        log.log_dict({"step": 3}, step=3)
    log.close()


def test_jsonl_resume_appends_and_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = JsonlLogger(path)
    for step in range(1, 5):
        log.log_dict({"train/loss": float(step)}, step=step)
    log.close()
    # crashed after step 4, resumed from the checkpoint at step 2: steps 3-4 are logged again
    log = JsonlLogger(path, drop_after_step=2)
    for step in (3, 4):
        log.log_dict({"train/loss": step + 0.5}, step=step)
    log.close()
    assert [(r["step"], r["train/loss"]) for r in read_jsonl(path)] == [(1, 1.0), (2, 2.0), (3, 3.5), (4, 4.5)]
    # plain reopening keeps everything and appends
    log = JsonlLogger(path)
    log.log_dict({"train/loss": 5.0}, step=5)
    log.close()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5]


def test_jsonl_log_config_and_read_errors(tmp_path):
    log = JsonlLogger(tmp_path / "metrics.jsonl")
    log.log_config({"lr": 1e-5, "out": Path("/x/y"), "nested": {"k": [1, 2]}})
    log.close()
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1e-5, "out": "/x/y", "nested": {"k": [1, 2]}}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n\n{"step": 2\n')
    with pytest.raises(ValueError, match="bad.jsonl:3: not valid JSON"):
        read_jsonl(bad)


def test_build_loggers_rank_gating_and_validation(tmp_path):
    assert isinstance(build_loggers(tmp_path / "r1", ["jsonl"], is_main=False), NullLogger)
    assert not (tmp_path / "r1").exists()
    with pytest.raises(ValueError, match=r"unknown logging backend\(s\) \['jsonl2'\]"):
        build_loggers(tmp_path, ["jsonl2"], is_main=False)
    with pytest.raises(ValueError, match="must not repeat"):
        build_loggers(tmp_path, ["jsonl", "jsonl"], is_main=True)
    log = build_loggers(tmp_path / "r0", ["jsonl"], is_main=True)
    log.log_dict({"a": 1.0}, step=7)
    log.close()
    assert read_jsonl(tmp_path / "r0" / "metrics.jsonl") == [{"step": 7, "a": 1.0}]


class _Recorder:
    def __init__(self):
        self.calls = []

    def log_dict(self, payload, step):
        self.calls.append(("log", dict(payload), step))

    def log_config(self, config):
        self.calls.append(("config", dict(config)))

    def close(self):
        self.calls.append(("close",))


def test_multi_logger_fans_out_in_order():
    a, b = _Recorder(), _Recorder()
    multi = MultiLogger([a, b])
    multi.log_config({"x": 1})
    multi.log_dict({"m": 2.0}, step=3)
    multi.close()
    assert a.calls == b.calls == [("config", {"x": 1}), ("log", {"m": 2.0}, 3), ("close",)]


def test_tensorboard_backend_with_a_stand_in_writer(tmp_path, monkeypatch):
    events = []

    class FakeWriter:
        def __init__(self, log_dir):
            events.append(("init", log_dir))

        def add_scalar(self, key, value, global_step):
            events.append(("scalar", key, value, global_step))

        def add_text(self, key, text, global_step=None):
            events.append(("text", key, text, global_step))

        def close(self):
            events.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = build_loggers(tmp_path, ["tensorboard"], is_main=True)
    log.log_dict({"train/loss": torch.tensor(2.0), "sample": "text"}, step=4)
    log.log_config({"a": 1})
    log.close()
    assert events[0] == ("init", str(tmp_path / "tensorboard"))
    assert events[1:3] == [("scalar", "train/loss", 2.0, 4), ("text", "sample", "text", 4)]
    assert events[3][:2] == ("text", "config") and '"a": 1' in events[3][2]
    assert events[4] == ("close",)


def test_missing_optional_backends_raise_a_clear_import_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # None in sys.modules -> ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        build_loggers(tmp_path, ["tensorboard"], is_main=True)
    with pytest.raises(ImportError, match="pip install wandb"):
        build_loggers(tmp_path, ["wandb"], is_main=True)


def test_wandb_backend_resumes_the_same_run(tmp_path, monkeypatch):
    inits, logged = [], []

    class FakeRun:
        def __init__(self, run_id):
            self.id = run_id
            self.config = types.SimpleNamespace(update=lambda cfg, allow_val_change: logged.append(("config", cfg)))

        def log(self, payload, step):
            logged.append(("log", payload, step))

        def finish(self):
            logged.append(("finish",))

    def init(project, name, dir, id, resume):
        inits.append({"project": project, "name": name, "dir": dir, "id": id, "resume": resume})
        return FakeRun(id or "abc123")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    for _ in range(2):
        log = build_loggers(tmp_path, ["wandb"], is_main=True, wandb_project="rrg", run_name="ppo")
        log.log_dict({"train/loss": np.float64(0.5)}, step=1)
        log.close()
    assert inits[0] == {"project": "rrg", "name": "ppo", "dir": str(tmp_path), "id": None, "resume": "allow"}
    assert inits[1]["id"] == "abc123"  # read back from out_dir/wandb_run_id
    assert logged[:2] == [("log", {"train/loss": 0.5}, 1), ("finish",)]
