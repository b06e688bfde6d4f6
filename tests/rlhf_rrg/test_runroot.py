import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlhf_rrg.runroot import (
    EXPORT_MARKER,
    STAGES,
    MissingStageOutputError,
    StageDirs,
    WrongStageOutputError,
    mark_export_complete,
    resolve_init,
    writing_export,
)

# The stage that starts from each stage's export (ppo may continue from a ppo export).
NEXT = {"pretrain": "align", "align": "sft", "sft": "ppo", "ppo": "ppo"}


def test_stage_dirs_layout(tmp_path):
    dirs = StageDirs(tmp_path, "sft")
    assert not dirs.root.exists()
    assert dirs.make() is dirs and dirs.root.is_dir()
    assert dirs.root == tmp_path / "sft"
    assert (dirs.export, dirs.checkpoints) == (tmp_path / "sft" / "export", tmp_path / "sft" / "checkpoints")
    assert (dirs.metrics, dirs.config) == (tmp_path / "sft" / "metrics.jsonl", tmp_path / "sft" / "config.yaml")


def test_resolve_init_from_scratch_and_from_a_directory(tmp_path):
    assert resolve_init(tmp_path, "sft", None) is None
    folder = tmp_path / "weights"
    folder.mkdir()
    assert resolve_init(tmp_path, "sft", str(folder)) == folder
    with pytest.raises(MissingStageOutputError, match=r"stage 'sft'.*nowhere'.*neither a stage name"):
        resolve_init(tmp_path, "sft", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("previous", STAGES)
def test_stage_name_needs_a_complete_export(tmp_path, previous):
    export = StageDirs(tmp_path, previous).export
    export.mkdir(parents=True)
    (export / "model.safetensors").write_bytes(b"")  # weights written, marker not yet: an interrupted export
    with pytest.raises(
        MissingStageOutputError, match=rf"'{previous}' export.*{EXPORT_MARKER} missing.*stages/{previous}.py"
    ):
        resolve_init(tmp_path, NEXT[previous], previous)
    mark_export_complete(export, {"stage": previous, "step": 3})
    assert resolve_init(tmp_path, NEXT[previous], previous) == export
    assert json.loads((export / EXPORT_MARKER).read_text()) == {"stage": previous, "step": 3}


def test_missing_stage_output_is_a_file_not_found_error():
    assert issubclass(MissingStageOutputError, FileNotFoundError)


@pytest.mark.parametrize("stage", ["pretrain", "align", "sft"])
def test_a_report_generator_export_is_refused_by_encoder_stages(tmp_path, stage):
    export = StageDirs(tmp_path, "sft").export
    export.mkdir(parents=True)
    (export / "config.json").write_text(json.dumps({"model_type": "llava"}))
    mark_export_complete(export, {"stage": "sft"})
    for init_from in ("sft", str(export)):
        with pytest.raises(WrongStageOutputError, match=rf"stage '{stage}'.*is a report-generator export.*vision"):
            resolve_init(tmp_path, stage, init_from)
    assert resolve_init(tmp_path, "ppo", "sft") == export


def test_ppo_refuses_a_vision_encoder_export(tmp_path):
    export = StageDirs(tmp_path, "pretrain").export
    export.mkdir(parents=True)
    (export / "config.json").write_text(json.dumps({"model_type": "rrg_vision"}))
    mark_export_complete(export, {"stage": "pretrain"})
    with pytest.raises(WrongStageOutputError, match="is not a report-generator export; ppo starts from an sft"):
        resolve_init(tmp_path, "ppo", "pretrain")


def test_export_replaces_the_old_one_only_when_complete(tmp_path):
    export = StageDirs(tmp_path, "pretrain").export
    with writing_export(export, {"version": 1}) as out:
        (out / "weights.bin").write_bytes(b"v1" * 100)
    with pytest.raises(RuntimeError, match="disk full"), writing_export(export, {"version": 2}) as out:
        (out / "weights.bin").write_bytes(b"v2")
        raise RuntimeError("disk full")
    assert json.loads((export / EXPORT_MARKER).read_text()) == {"version": 1}
    assert (export / "weights.bin").read_bytes() == b"v1" * 100
    with writing_export(export, {"version": 3}) as out:
        (out / "weights.bin").write_bytes(b"v3")
    assert json.loads((export / EXPORT_MARKER).read_text()) == {"version": 3}
    assert sorted(p.name for p in export.parent.iterdir()) == ["export"]


def test_a_sigkilled_re_export_leaves_the_previous_export_whole(tmp_path):
    export = StageDirs(tmp_path, "pretrain").export
    with writing_export(export, {"version": 1}) as out:
        (out / "weights.bin").write_bytes(b"v1" * 100)
    partial = export.with_name(f".tmp_{export.name}") / "weights.bin"
    script = (f"from rlhf_rrg.runroot import writing_export\nimport time\n"
              f"with writing_export({str(export)!r}, {{'version': 2}}) as out:\n"
              f"    (out / 'weights.bin').write_bytes(b'v2')\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 60
    while not partial.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert partial.is_file(), "the exporting process never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((export / EXPORT_MARKER).read_text()) == {"version": 1}
    assert (export / "weights.bin").read_bytes() == b"v1" * 100
    assert resolve_init(tmp_path, "align", "pretrain") == export
