import logging
import os
import random
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from rlhf_rrg.distributed import (
    built_whole,
    check_world_size,
    configure_deepspeed,
    deepspeed_on_cpu,
    gather_params,
    is_main_process,
    preserved_rng,
    print0,
    rng_state,
    seed_everything,
    set_rng_state,
    torch_extensions_dir,
    zero_offload,
    zero_stage,
)


def _draws() -> tuple:
    return (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())


def test_seed_everything_makes_all_streams_repeat():
    seed_everything(123)
    first = _draws()
    seed_everything(123)
    assert _draws() == first
    seed_everything(124)
    assert _draws() != first


def test_seed_range_is_checked():
    with pytest.raises(ValueError, match="seed must be in"):
        seed_everything(-1)
    with pytest.raises(ValueError, match="seed must be in"):
        seed_everything(2**32)


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path):
    seed_everything(7)
    _draws()
    np.random.randn()  # leaves a cached Box-Muller value in numpy's state (has_gauss=1)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = [_draws() for _ in range(3)]
    seed_everything(999)
    _draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert [_draws() for _ in range(3)] == expected


def test_preserved_rng_restores_every_stream():
    seed_everything(5)
    _draws()
    expected = [_draws() for _ in range(2)]
    seed_everything(5)
    _draws()
    with preserved_rng():
        _draws()  # an evaluation drawing from Python, NumPy and torch
    assert [_draws() for _ in range(2)] == expected


def test_set_rng_state_rejects_foreign_dicts():
    with pytest.raises(ValueError, match=r"lacks \['numpy', 'python'\]"):
        set_rng_state({"torch": torch.get_rng_state()})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_cuda_state_without_cuda_is_skipped_with_a_warning(caplog):
    state = rng_state()
    assert "cuda" not in state
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    with caplog.at_level(logging.WARNING, logger="rlhf_rrg.distributed"):
        set_rng_state(state)
    assert "CUDA RNG state not restored" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_round_trip():
    seed_everything(5)
    state = rng_state()
    expected = torch.rand(4, device="cuda").tolist()
    torch.rand(10, device="cuda")
    set_rng_state(state)
    assert torch.rand(4, device="cuda").tolist() == expected


def test_torch_extensions_dir_is_per_python_environment_unless_set(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    here = torch_extensions_dir()
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-other-venv")
    assert torch_extensions_dir() != here and os.path.dirname(torch_extensions_dir()) == os.path.dirname(here)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/chosen")
    assert torch_extensions_dir() == "/chosen"


def test_single_process_is_main_and_prints(capsys):
    assert is_main_process()
    print0("hello", 3)
    assert capsys.readouterr().out == "hello 3\n"


def test_world_size_must_match_the_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_world_size(1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_world_size(2)
    # What a CPU launch without ACCELERATE_USE_CPU gives: 2 processes that each see a world of 1.
    with pytest.raises(RuntimeError, match="started 2 processes .* accelerate sees 1.*ACCELERATE_USE_CPU=true"):
        check_world_size(1)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the CPU-only route")
def test_a_deepspeed_launch_on_cpu_is_recognised(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert not deepspeed_on_cpu()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for a DEEPSPEED config
    assert deepspeed_on_cpu()


def test_deepspeed_helpers_do_nothing_without_deepspeed():
    accelerator = Accelerator(cpu=True)
    assert zero_stage(accelerator) == 0 and zero_offload(accelerator) == (False, False)
    configure_deepspeed(accelerator, micro_batch_size=4, grad_clip=0.5)
    with built_whole(accelerator):
        assert torch.nn.Linear(2, 2).weight.shape == (2, 2)


def test_gather_params_is_a_no_op_without_zero3():
    model = torch.nn.Linear(3, 2)
    before = model.weight.detach().clone()
    with gather_params(model, modifier_rank=0):
        assert model.weight.shape == (2, 3)
    torch.testing.assert_close(model.weight, before)


_ZERO3_SCRIPT = textwrap.dedent(
    """
    import deepspeed, torch
    from rlhf_rrg.distributed import gather_params

    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    assert model[0].weight.shape == (0,), model[0].weight.shape  # partitioned: nothing visible outside
    with gather_params(model, modifier_rank=0):
        assert model[0].weight.shape == (3, 4) and model[1].bias.shape == (2,)
        with torch.no_grad():
            model[0].weight.fill_(0.5)
    assert model[0].weight.shape == (0,)
    with gather_params(model):
        assert float(model[0].weight.sum()) == 6.0  # the modification made under modifier_rank survived
    print("ZERO3_OK")
    """
)


@pytest.mark.distributed
def test_gather_params_under_real_zero3(tmp_path):
    # A fresh process: DeepSpeed initialises torch.distributed, which must not leak into this test session.
    # The first run on a machine JIT-builds DeepSpeed's CPU comm op (about 2 minutes); later runs take seconds.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "OMP_NUM_THREADS": "1",
    }
    script = tmp_path / "zero3.py"
    script.write_text(_ZERO3_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0 and "ZERO3_OK" in result.stdout, result.stderr[-3000:]
