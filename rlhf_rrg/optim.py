"""AdamW with decoupled weight decay (none on norms/biases/embeddings of position) and a warmup schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay on matrices only"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    schedule: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata={"help": "decay shape"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "final lr as a fraction of lr"})
    grad_clip: float = field(default=1.0, metadata={"help": "max grad norm; 0 disables clipping"})

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm gains, tokens and position tables are not "weights" in the regularisation sense.
    return param.ndim < 2 or any(k in name for k in ("pos_embed", "cls_token", "logit_scale", "A_log", "A_b_log"))


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr_scales: dict[str, float] | None = None,
                    ) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model``, split into decay / no-decay groups.

    ``lr_scales`` maps a parameter-name prefix to a multiplier of ``cfg.lr`` for the parameters under it (e.g. a
    small head that must move further than LoRA weights in the same number of steps). Each group records its scale
    and the prefix it came from, for :func:`learning_rates`.
    """
    scales = lr_scales or {}
    groups: dict[tuple[bool, str, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            prefix, scale = next(((p, v) for p, v in scales.items() if name.startswith(p)), ("", 1.0))
            groups.setdefault((_no_decay(name, param), prefix.rstrip("."), scale), []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters (check the freeze settings)")
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay, "lr": cfg.lr * scale,
          "lr_scale": scale, "name": prefix or "base"}
         for (no_decay, prefix, scale), params in groups.items()],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The scheduled base rate (``optim.lr`` times the schedule) as ``train/lr``, and the rate of each group with
    its own scale as ``train/lr/<prefix>``: the first group alone may be a scaled one (e.g. the vision tower's)."""
    first = optimizer.param_groups[0]
    # Optimizer states saved before groups recorded their scale are all unscaled or led by an unscaled group.
    rates = {"train/lr": first["lr"] / first.get("lr_scale", 1.0)}
    for group in optimizer.param_groups:
        if group.get("lr_scale", 1.0) != 1.0:
            rates[f"train/lr/{group['name']}"] = group["lr"]
    return rates


def module_prefix(model: nn.Module, submodule: nn.Module) -> str:
    """The parameter-name prefix of ``submodule`` inside ``model`` (whatever wrappers, such as peft's, sit between
    them), for ``build_optimizer``'s ``lr_scales``."""
    name = next((name for name, module in model.named_modules() if module is submodule), None)
    if name is None:
        raise ValueError(f"{type(submodule).__name__} is not a submodule of {type(model).__name__}")
    return f"{name}." if name else ""


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step`` (0-based): linear warmup, then the configured decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
