"""The few process-level helpers stages need: rank-0 printing, ZeRO-3 parameter gathering, seeding and RNG state,
and where launched processes keep DeepSpeed's JIT-built ops.

Process topology comes from ``accelerate.PartialState`` (so it agrees with the ``Accelerator`` of the stage);
nothing here calls ``torch.distributed`` directly. Anchors: nanochat ``common.py: print0``, TRL
``unwrap_model_for_generation`` (ZeRO-3 gathering), torchtune ``training/seed.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType

logger = logging.getLogger(__name__)

# numpy's legacy global RNG only accepts 32-bit seeds.
_MAX_SEED = 2**32 - 1


def torch_extensions_dir() -> str:
    """``$TORCH_EXTENSIONS_DIR``, else one folder per Python environment under ``~/.cache/torch_extensions``: two
    venvs sharing one folder rebuild DeepSpeed's JIT ops (e.g. its CPU comm op) in turn, since their include paths
    differ, and a process loading an op while another rebuilds it can abort."""
    prefix = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / f"env-{prefix}"))


def is_main_process() -> bool:
    """Whether this is the global rank-0 process (``True`` when not launched distributed)."""
    return PartialState().is_main_process


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on the main process only, for console output of launch scripts (metrics go to loggers)."""
    if is_main_process():
        print(*args, **kwargs)  # noqa: T201 - this helper exists to print, once, for stages


@contextlib.contextmanager
def gather_params(model: torch.nn.Module, modifier_rank: int | None = None) -> Iterator[None]:
    """Makes a ZeRO-3 partitioned model's full parameters visible inside the block; a no-op otherwise.

    Under DeepSpeed ZeRO-3 each rank holds only a shard (``p.shape == (0,)``); generation, weight export
    or reading a parameter needs ``deepspeed.zero.GatheredParameters``. Partitioned parameters are
    recognised by DeepSpeed's ``ds_id`` attribute, so no accelerator object is needed and DeepSpeed is
    imported only when such parameters exist. Must be entered on every rank (it is a collective).

    Args:
        model: Any module (wrapped or not).
        modifier_rank: Rank whose in-block modifications are broadcast to all ranks on exit; ``None`` means
            the block only reads.

    Yields:
        Nothing; use ``model`` inside the block.
    """
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


@torch.no_grad()
def clamp_parameter_(param: torch.nn.Parameter, low: float, high: float) -> None:
    """Clamps ``param`` in place together with the copies DeepSpeed ZeRO trains in its stead.

    ZeRO's optimizer steps an fp32 master copy of the parameters (each process the part it owns) and writes it over
    the parameters after every step, so clamping the parameter alone is undone by the next step. Clamping is
    elementwise: each process clamps the parts it holds, with no communication. Under ZeRO-3 ``param`` itself is
    empty outside a forward unless small enough to stay whole (``stage3_param_persistence_threshold``); its part lies
    in ``ds_tensor``.

    Args:
        param: Any parameter (of a model prepared for DeepSpeed or not).
        low: Lower bound.
        high: Upper bound.
    """
    param.data.clamp_(low, high)
    if hasattr(param, "ds_tensor"):
        param.ds_tensor.data.clamp_(low, high)
    if not param.requires_grad:  # no master copy
        return
    if getattr(param, "_z3_optimizer", None) is not None:
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(low, high))
    elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2: the fragment of the master this process owns
        param._hp_mapping.get_hp_fragment().clamp_(low, high)


@torch.no_grad()
def set_parameter_(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Sets ``param`` to ``value`` together with the copies DeepSpeed ZeRO keeps of it, so the next optimizer step
    does not undo it: the part this process holds under ZeRO-3 and the fp32 master copy the optimizer steps (see
    :func:`clamp_parameter_`). Every process must call it with the same ``value`` (the parameter's full shape); under
    ZeRO-3 inside :func:`gathered_weights` the whole parameter reads ``value`` until the block ends.
    """
    value = value.to(param.device, param.dtype)
    if param.numel() == value.numel():  # whole here: not partitioned, or gathered
        param.data.copy_(value.view_as(param))
    if hasattr(param, "ds_tensor"):
        shard = param.ds_tensor
        rank = torch.distributed.get_rank(group=getattr(param, "ds_process_group", None))
        part = value.flatten()[shard.ds_numel * rank:shard.ds_numel * (rank + 1)]
        shard.data.view(-1)[:part.numel()].copy_(part)  # the last part may carry padding
    if param.requires_grad and (hasattr(param, "ds_id") or getattr(param, "_hp_mapping", None) is not None):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float())


def deepspeed_on_cpu() -> bool:
    """Whether ``accelerate launch`` started this process for DeepSpeed on a machine without an accelerator."""
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return launched and not torch.accelerator.is_available()


def build_accelerator(**kwargs: Any) -> Accelerator:
    """``Accelerator(**kwargs)``, with DeepSpeed on CPU processes joined into one gloo group.

    accelerate 1.15 cannot start DeepSpeed on CPU by itself (``accelerate/state.py``): with ``ACCELERATE_USE_CPU``
    set, ``AcceleratorState`` drops DeepSpeed (``... and not cpu``) and trains with DDP; without it, ``PartialState``
    finds no device backend, calls ``deepspeed.init_distributed(dist_backend=None)`` and then counts ONE process
    per rank. Naming the backend (``PartialState(backend="gloo")``) before the ``Accelerator`` exists makes it
    initialise DeepSpeed's gloo group and read the real world size; ``ACCELERATE_USE_CPU`` is dropped from this
    process's environment first (the CPU device follows from there being no accelerator). Anywhere else (GPUs, DDP
    on CPU, one plain process) this is ``Accelerator(**kwargs)``.
    """
    if deepspeed_on_cpu() and not PartialState._shared_state:
        os.environ.pop("ACCELERATE_USE_CPU", None)
        PartialState(backend="gloo")
    return Accelerator(**kwargs)


def zero_stage(accelerator: Accelerator) -> int:
    """The DeepSpeed ZeRO stage the accelerator trains with; 0 without DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def zero_offload(accelerator: Accelerator) -> tuple[bool, bool]:
    """Whether DeepSpeed ZeRO keeps (the optimizer state, the parameter partitions) off the device, in CPU memory or on
    NVMe; ``(False, False)`` without DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False, False
    zero = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
    return (zero.get("offload_optimizer", {}).get("device", "none") != "none",
            zero.get("offload_param", {}).get("device", "none") != "none")


def configure_deepspeed(accelerator: Accelerator, micro_batch_size: int, grad_clip: float) -> None:
    """Fills the DeepSpeed settings ``accelerator.prepare`` cannot infer from our loops; a no-op without DeepSpeed.

    Call it before ``prepare``. ``micro_batch_size``: samples per process per backward (our batch samplers hide
    the loader's batch size, which accelerate would read); ``grad_clip``: the max grad norm the DDP path clips to
    (DeepSpeed clips inside its step and ignores ``accelerator.clip_grad_norm_``; accelerate's "auto" is 1.0
    whatever the stage config says; 0 disables clipping in both).

    On CPU processes ZeRO-3 partitions every parameter: DeepSpeed keeps those of at most
    ``stage3_param_persistence_threshold`` elements (default 1e5) whole on every process, and every weight of the tiny
    models CPU runs train is that small, so ZeRO-3 would partition none of them and no CPU run would meet the
    partitioned weights GPU runs of real models hold.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_clipping"] = grad_clip
    if deepspeed_on_cpu() and zero_stage(accelerator) == 3:
        config["zero_optimization"].setdefault("stage3_param_persistence_threshold", 0)


@contextlib.contextmanager
def built_whole(accelerator: Accelerator) -> Iterator[None]:
    """Models constructed in the block are whole on every process under ZeRO-3 with ``zero3_init_flag: false``.

    accelerate 1.15 registers its DeepSpeed config with transformers (``HfDeepSpeedConfig``) whatever
    ``zero3_init_flag`` says, and transformers then builds every model (``from_config``, ``from_pretrained``) inside
    ``deepspeed.zero.Init``: partitioned at construction, so a stage could not run or edit it (memory bank, LoRA,
    weight grafting) before ``accelerator.prepare``. The block hides that config from transformers and restores it
    on exit (generation then syncs the ranks as under any ZeRO-3). With the flag true (``zero3.yaml``) and without
    ZeRO-3 it does nothing.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3 or plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


@contextlib.contextmanager
def gathered_weights(accelerator: Accelerator, model: torch.nn.Module) -> Iterator[None]:
    """Under ZeRO-3, the prepared ``model`` is whole on every process inside the block; a no-op otherwise.

    Every process gathers all weights once and DeepSpeed's per-module hooks (which gather before, and release after,
    each submodule's forward, collectively) are removed until the block ends, as TRL does for generation
    (``trl.models.utils.unwrap_model_for_generation``). transformers' DeepSpeed config is hidden as well, so
    ``generate`` does not sync with the other processes. Inside, each process can generate on its own data, and one
    process alone can evaluate or export the model. Must be entered on every process (the gather is collective).

    Args:
        model: The model returned by ``accelerator.prepare`` (the DeepSpeed engine under DeepSpeed).
    """
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed
    from transformers.integrations import unset_hf_deepspeed_config
    from trl.models.utils import add_hooks, remove_hooks

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        remove_hooks(model)
        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            accelerator.state.deepspeed_plugin.set_deepspeed_weakref()
            add_hooks(model)


def check_world_size(num_processes: int) -> None:
    """Fails when the launcher started more processes than the ``Accelerator`` joined into one group.

    ``torchrun`` (or ``accelerate launch`` with a multi-process config) sets ``WORLD_SIZE``; on a machine without
    CUDA, accelerate only forms a gloo group when ``ACCELERATE_USE_CPU=true``, otherwise every process trains
    alone and they overwrite each other's outputs.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but accelerate sees {num_processes}; on CPU set "
            "ACCELERATE_USE_CPU=true (see accelerate_configs/cpu_ddp.yaml)")


def seed_everything(seed: int) -> None:
    """Seeds Python's ``random``, numpy's global RNG and torch (CPU and every CUDA device).

    Args:
        seed: In ``[0, 2**32 - 1]``.
    """
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be in [0, {_MAX_SEED}], got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Captures the Python, numpy, torch CPU and (when available) CUDA RNG states for exact resume.

    Only tuples, ints, floats, strings and tensors are used, so the result loads with
    ``torch.load(..., weights_only=True)``.

    Returns:
        A dict with keys ``python``, ``numpy``, ``torch`` and, with CUDA, ``cuda``.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores RNG states captured by :func:`rng_state`.

    A CUDA state saved on a GPU machine but restored without CUDA (or the reverse) is skipped with a
    warning: the CPU streams are still exact, GPU sampling is not.

    Args:
        state: The dict returned by :func:`rng_state` (possibly after a ``torch.save``/``torch.load``).
    """
    missing = {"python", "numpy", "torch"} - state.keys()
    if missing:
        raise ValueError(f"RNG state lacks {sorted(missing)}; expected the dict from rng_state()")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np.asarray(np_state["key"], dtype=np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    elif "cuda" in state or torch.cuda.is_available():
        logger.warning(
            "CUDA RNG state not restored: saved with CUDA=%s, now CUDA=%s", "cuda" in state, torch.cuda.is_available()
        )


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restores every RNG stream :func:`rng_state` captures (Python, NumPy, torch, CUDA) on exit.

    Evaluations draw from them (an eval loader's seed, sampling), and ``train.eval_every`` must not change what
    training does.
    """
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
