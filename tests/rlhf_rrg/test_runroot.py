import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from rlhf_rrg.runroot import (
    EXPORT_MARKER,
    STAGES,
    DamagedExportError,
    MissingStageOutputError,
    StageDirs,
    WrongStageOutputError,
    mark_export_complete,
    recorded_lineage,
    resolve_init,
    verify_export,
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
    marker = json.loads((export / EXPORT_MARKER).read_text())
    assert (marker["stage"], marker["step"]) == (previous, 3)


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
    assert json.loads((export / EXPORT_MARKER).read_text())["version"] == 1
    assert (export / "weights.bin").read_bytes() == b"v1" * 100
    with writing_export(export, {"version": 3}) as out:
        (out / "weights.bin").write_bytes(b"v3")
    assert json.loads((export / EXPORT_MARKER).read_text())["version"] == 3
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
    assert json.loads((export / EXPORT_MARKER).read_text())["version"] == 1
    assert (export / "weights.bin").read_bytes() == b"v1" * 100
    assert resolve_init(tmp_path, "align", "pretrain") == export


def _version(export):
    return json.loads((export / EXPORT_MARKER).read_text())["version"]


class Crash(RuntimeError):
    """Stands for the process dying at that point: nothing after it runs, the files stay as they are."""


# Each step of the swap after the new export is marked, and the version a crash there leaves as the export.
SWAP_STEPS = {"rename the export aside": 1, "rename the new export in": 2, "remove the previous export": 2}


@pytest.mark.parametrize("step", list(SWAP_STEPS))
def test_a_crash_at_any_step_of_the_swap_leaves_a_complete_export(tmp_path, monkeypatch, step):
    export = StageDirs(tmp_path, "pretrain").export
    with writing_export(export, {"version": 1}) as out:
        (out / "weights.bin").write_bytes(b"v1")
    with monkeypatch.context() as patch:
        renames = []

        def rename(self, target):
            renames.append(self)
            if step == list(SWAP_STEPS)[len(renames) - 1]:
                raise Crash(step)
            return os.rename(self, target)

        def rmtree(path, *args, **kwargs):
            raise Crash(step)

        patch.setattr(pathlib.Path, "rename", rename)
        patch.setattr(shutil, "rmtree", rmtree)
        with pytest.raises(Crash), writing_export(export, {"version": 2}) as out:
            (out / "weights.bin").write_bytes(b"v2")
    # The next stage finds a complete export (put back from where the crash left it), and so does the next export.
    assert resolve_init(tmp_path, "align", "pretrain") == export
    assert _version(export) == SWAP_STEPS[step]
    assert (export / "weights.bin").read_bytes() == f"v{SWAP_STEPS[step]}".encode()
    with writing_export(export, {"version": 3}) as out:
        (out / "weights.bin").write_bytes(b"v3")
    assert _version(export) == 3 and sorted(p.name for p in export.parent.iterdir()) == ["export"]


def test_the_next_export_puts_back_a_complete_copy_instead_of_deleting_it(tmp_path):
    export = StageDirs(tmp_path, "pretrain").export
    with writing_export(export, {"version": 1}) as out:
        (out / "weights.bin").write_bytes(b"v1")
    export.rename(export.with_name(".old_export"))  # the swap died after setting v1 aside...
    export.with_name(".tmp_export").mkdir()  # ... with a new export that was never finished
    with pytest.raises(RuntimeError, match="killed"), writing_export(export, {"version": 2}):
        raise RuntimeError("killed")
    assert _version(verify_export(export)) == 1


def _damage(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_damage, lambda p: p.write_bytes(p.read_bytes()[:3]), os.remove])
def test_a_damaged_export_is_named_before_the_next_stage_loads_it(tmp_path, damage):
    export = StageDirs(tmp_path, "pretrain").export
    with writing_export(export, {"stage": "pretrain"}) as out:
        (out / "model.safetensors").write_bytes(b"weights" * 10)
        (out / "config.json").write_text(json.dumps({"model_type": "rrg_vision"}))
    marker = json.loads((export / EXPORT_MARKER).read_text())
    assert marker["files"]["model.safetensors"]["size"] == 70 and len(marker["export_id"]) == 64
    damage(export / "model.safetensors")
    for init_from in ("pretrain", str(export)):
        with pytest.raises(DamagedExportError, match=rf"export {export} is damaged: .*export/model.safetensors"):
            resolve_init(tmp_path, "align", init_from)
    assert issubclass(DamagedExportError, MissingStageOutputError)  # a one-line error of the stage's command line


def test_an_export_marked_before_markers_recorded_files_still_loads(tmp_path):
    export = StageDirs(tmp_path, "pretrain").export
    export.mkdir(parents=True)
    (export / "model.safetensors").write_bytes(b"weights")
    (export / EXPORT_MARKER).write_text(json.dumps({"stage": "pretrain"}))
    assert resolve_init(tmp_path, "align", "pretrain") == export


def test_the_marker_records_lineage_and_data_without_machine_paths(tmp_path):
    run, data = tmp_path / "run", tmp_path / "data" / "synthetic"
    for stage, init_from in (("pretrain", None), ("align", "pretrain")):
        config = {"run": {"run_root": str(run), "init_from": init_from},
                  "data": {"dataset": "synthetic", "annotation_path": str(data / "annotation.json")}}
        StageDirs(run, stage).make().config.write_text(yaml.safe_dump(config))
    with writing_export(StageDirs(run, "pretrain").export, {"stage": "pretrain"}) as out:
        (out / "weights.bin").write_bytes(b"v1")
    align = StageDirs(run, "align").export
    info = {"stage": "align", "vision": str(run / "pretrain" / "export"), "text": "/models/text-encoder"}
    with writing_export(align, info) as out:
        (out / "weights.bin").write_bytes(b"v1")
    text = (align / EXPORT_MARKER).read_text()
    assert str(tmp_path) not in text
    marker = json.loads(text)
    assert (marker["vision"], marker["text"]) == ("pretrain/export", "text-encoder")
    lineage = recorded_lineage(align)
    assert [entry["stage"] for entry in lineage] == ["pretrain", "align"]
    assert lineage[1]["config"]["data"] == {"dataset": "synthetic", "annotation_path": "annotation.json"}
    assert lineage[1]["config"]["run"] == {"run_root": ".", "init_from": "pretrain"}

    # Copied out of its run root, the export keeps its record.
    copy = tmp_path / "elsewhere" / "export"
    shutil.copytree(align, copy)
    shutil.rmtree(run)
    assert recorded_lineage(copy) == lineage
