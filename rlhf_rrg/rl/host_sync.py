"""Logging scalars reach the host in one transfer per step.

Every ``.item()`` on an accelerator tensor stalls the host until the device has caught up; an RL step logs a
dozen or so scalars, so they are stacked on the device and moved together.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from accelerate import Accelerator


def _stacked(values: Mapping[str, torch.Tensor | float], device: torch.device) -> torch.Tensor:
    """``(len(values),)`` fp32 tensor on ``device``; every tensor value must be a scalar (one element)."""
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise ValueError(f"metric {key!r} must be a scalar, got shape {tuple(value.shape)}")
    return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in values.values()])


def to_host(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Scalars (tensors on one device, or floats) as Python floats, with one device-to-host move."""
    if not values:
        return {}
    device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    return dict(zip(values, _stacked(values, device).tolist(), strict=True))


def reduce_to_host(accelerator: Accelerator, values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Each scalar averaged over processes (one collective) and moved to the host in one transfer."""
    if not values:
        return {}
    reduced = accelerator.reduce(_stacked(values, accelerator.device), "mean")
    return dict(zip(values, reduced.tolist(), strict=True))
