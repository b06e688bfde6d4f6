import pytest
import torch
from accelerate import Accelerator

from rlhf_rrg.rl.host_sync import reduce_to_host, to_host


def test_to_host_moves_everything_in_one_transfer(monkeypatch):
    moves = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            moves.append(name)
            return original(self, *args, **kwargs)

        return method

    for name in ("item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    values = {"a": torch.tensor(1.5), "b": torch.tensor([2.0]).sum(), "c": 0.25, "d": torch.tensor(3)}
    assert to_host(values) == {"a": 1.5, "b": 2.0, "c": 0.25, "d": 3.0}
    assert moves == ["tolist"]


def test_non_scalar_metric_is_named():
    with pytest.raises(ValueError, match="'loss' must be a scalar"):
        to_host({"ok": torch.tensor(1.0), "loss": torch.ones(2)})


def test_reduce_to_host_single_process():
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 1
    assert reduce_to_host(accelerator, {"x": torch.tensor(2.0), "y": 4}) == {"x": 2.0, "y": 4.0}
    assert reduce_to_host(accelerator, {}) == {}
