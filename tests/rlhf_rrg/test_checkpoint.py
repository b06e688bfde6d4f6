"""Checkpoint manifests on real Accelerate checkpoints: every kind of damage is named, resume falls back past it."""

import json

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from rlhf_rrg.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointManager,
    TrainState,
    checkpoint_problem,
    select_valid_checkpoint,
)


def manager(directory, keep: int = 3) -> tuple[CheckpointManager, nn.Module, TrainState]:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    return CheckpointManager(accelerator, directory, keep), model, state


def train_and_save(ckpt: CheckpointManager, model: nn.Module, state: TrainState, steps: list[int]) -> dict:
    """Changes the weights before each save; returns the saved weights by step."""
    saved = {}
    for step in steps:
        with torch.no_grad():
            model.weight.add_(1.0)
        state.step = step
        ckpt.save(step)
        saved[step] = model.weight.detach().clone()
    return saved


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "model.safetensors": (truncate, "bytes, the manifest says"),
    "optimizer.bin": (lambda p: p.write_bytes(b""), "has 0 bytes"),
    "random_states_0.pkl": (truncate, "bytes, the manifest says"),
    "custom_checkpoint_0.pkl": (flip_last_byte, "does not match its SHA-256"),  # the TrainState
}


def test_the_manifest_lists_every_file_with_size_and_hash(tmp_path):
    ckpt, model, state = manager(tmp_path)
    train_and_save(ckpt, model, state, [1])
    folder = tmp_path / "step_000001"
    files = json.loads((folder / MANIFEST).read_text())["files"]
    assert set(files) == {p.name for p in folder.iterdir() if p.name != MANIFEST}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(files)
    assert all(files[name]["size"] == (folder / name).stat().st_size for name in files)
    assert checkpoint_problem(folder) is None


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damage_is_named_and_resume_falls_back(tmp_path, caplog, name):
    damage, message = DAMAGE[name]
    ckpt, model, state = manager(tmp_path)
    saved = train_and_save(ckpt, model, state, [1, 2])
    damage(tmp_path / "step_000002" / name)
    problem = checkpoint_problem(tmp_path / "step_000002")
    assert message in problem and name in problem
    with pytest.raises(CheckpointError, match=rf"cannot resume from .*step_000002: .*{name}"):
        ckpt.resume(tmp_path / "step_000002")

    fresh, fresh_model, fresh_state = manager(tmp_path)
    assert fresh.resume() == tmp_path / "step_000001"
    assert fresh_state.step == 1
    torch.testing.assert_close(fresh_model.weight.detach(), saved[1])
    assert f"skipping damaged checkpoint {tmp_path / 'step_000002'}" in caplog.text and name in caplog.text
    # Renamed so that rotation never counts it as the newest checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["invalid_step_000002", "step_000001"]


def test_a_step_damaged_again_after_a_resume_is_set_aside_beside_the_first(tmp_path):
    ckpt, model, state = manager(tmp_path)
    train_and_save(ckpt, model, state, [1, 2])
    truncate(tmp_path / "step_000002" / "model.safetensors")
    assert select_valid_checkpoint(tmp_path) == tmp_path / "step_000001"
    # The resumed run saves step 2 again, and that copy is damaged too: both damaged copies are kept.
    train_and_save(ckpt, model, state, [2])
    truncate(tmp_path / "step_000002" / "model.safetensors")
    assert select_valid_checkpoint(tmp_path) == tmp_path / "step_000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["invalid_step_000002", "invalid_step_000002.1",
                                                          "step_000001"]


def test_no_valid_checkpoint_is_an_error_naming_each_file(tmp_path):
    ckpt, model, state = manager(tmp_path)
    train_and_save(ckpt, model, state, [1, 2])
    truncate(tmp_path / "step_000001" / "model.safetensors")
    (tmp_path / "step_000002" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"step_000002/manifest.json is missing.*step_000001/model.safetensors"):
        select_valid_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000002"]


def test_an_empty_folder_has_nothing_to_resume(tmp_path):
    assert select_valid_checkpoint(tmp_path / "none") is None
    assert manager(tmp_path)[0].resume() is None


def test_damage_after_a_successful_check_is_still_found(tmp_path):
    ckpt, model, state = manager(tmp_path)
    train_and_save(ckpt, model, state, [1])
    folder = tmp_path / "step_000001"
    assert checkpoint_problem(folder) is None
    flip_last_byte(folder / "model.safetensors")
    assert "model.safetensors does not match its SHA-256" in checkpoint_problem(folder)
