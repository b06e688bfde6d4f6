"""Every accelerate_configs/*.yaml loads through accelerate's own config classes with the intended settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DeepSpeedPlugin, DistributedType

CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs"

# file -> (distributed_type, num_processes, use_cpu, mixed_precision, zero stage, optimizer/param offload device)
EXPECTED: dict[str, tuple[DistributedType, int, bool, str, int | None, str | None]] = {
    "cpu_debug.yaml": (DistributedType.NO, 1, True, "no", None, None),
    # torchrun-style launch (a MULTI_CPU config starts one process without mpirun); see the file.
    "cpu_ddp.yaml": (DistributedType.MULTI_GPU, 2, True, "no", None, None),
    "single_gpu.yaml": (DistributedType.NO, 1, False, "bf16", None, None),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 8, False, "bf16", None, None),
    "zero2.yaml": (DistributedType.DEEPSPEED, 8, False, "bf16", 2, "none"),
    # DeepSpeed on 2 CPU processes (gloo); rlhf_rrg.distributed.build_accelerator joins them (see the files).
    "zero2_cpu.yaml": (DistributedType.DEEPSPEED, 2, True, "no", 2, "none"),
    "zero3_cpu.yaml": (DistributedType.DEEPSPEED, 2, True, "no", 3, "none"),
    "zero3_offload_cpu.yaml": (DistributedType.DEEPSPEED, 2, True, "no", 3, "cpu"),
    "zero3.yaml": (DistributedType.DEEPSPEED, 8, False, "bf16", 3, "none"),
    "zero3_offload.yaml": (DistributedType.DEEPSPEED, 8, False, "bf16", 3, "cpu"),
    "multi_node.yaml": (DistributedType.DEEPSPEED, 16, False, "bf16", 2, "none"),
}


def test_every_config_has_an_expectation() -> None:
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_expected_settings(name: str) -> None:
    path = CONFIG_DIR / name
    # ClusterConfig.from_yaml_file raises on keys accelerate does not know, so typos cannot hide here.
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config == ClusterConfig.from_yaml_file(str(path))
    dist, procs, use_cpu, precision, stage, offload = EXPECTED[name]
    assert config.distributed_type == dist
    assert config.num_processes == procs
    assert bool(config.use_cpu) == use_cpu
    assert str(config.mixed_precision) == precision
    ds: dict[str, Any] = config.deepspeed_config or {}
    if stage is None:
        assert not ds
        return
    assert ds["zero_stage"] == stage
    assert ds["offload_optimizer_device"] == ds["offload_param_device"] == offload
    # ZeRO-3 must gather 16-bit weights on save, or a saved export holds empty partitions.
    assert ds.get("zero3_save_16bit_model", False) == (stage == 3)
    plugin = DeepSpeedPlugin(
        zero_stage=stage,
        offload_optimizer_device=offload,
        offload_param_device=offload,
        zero3_init_flag=ds["zero3_init_flag"],
        zero3_save_16bit_model=ds.get("zero3_save_16bit_model", False),
    )
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage and zero["offload_optimizer"]["device"] == offload


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_holds_no_paths(name: str) -> None:
    config = load_config_from_file(str(CONFIG_DIR / name)).to_dict()
    values = [v for v in config.values() if isinstance(v, str)]
    values += [v for v in (config.get("deepspeed_config") or {}).values() if isinstance(v, str)]
    assert not [v for v in values if "/" in v], "paths belong in stage configs, not accelerate configs"
