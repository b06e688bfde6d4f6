import json

import pytest

from rlhf_rrg.runroot import (
    EXPORT_MARKER,
    STAGES,
    MissingStageOutputError,
    StageDirs,
    mark_export_complete,
    resolve_init,
)


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
        resolve_init(tmp_path, "next", previous)
    mark_export_complete(export, {"stage": previous, "step": 3})
    assert resolve_init(tmp_path, "next", previous) == export
    assert json.loads((export / EXPORT_MARKER).read_text()) == {"stage": previous, "step": 3}


def test_missing_stage_output_is_a_file_not_found_error():
    assert issubclass(MissingStageOutputError, FileNotFoundError)
