"""Self-critical sequence training (Rennie et al. 2017) for report generation (Miura et al. 2021 / ViLMedic).

The greedy report of each study is the baseline: ``L = -(r(sampled) - r(greedy)) * log p(sampled) / len``,
plus an optional teacher-forced NLL of the reference report that keeps the policy fluent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from rlhf_rrg.rl.host_sync import to_host
from rlhf_rrg.rl.losses import scst_loss
from rlhf_rrg.rl.ppo_step import optimizer_step
from rlhf_rrg.rl.rollout import Rollout


@dataclass
class SCSTConfig:
    num_samples: int = field(default=1, metadata={"help": "sampled reports per study, each against its greedy one"})
    nll_weight: float = field(default=0.0, metadata={"help": "weight of the reference-report NLL term"})
    length_normalize: bool = field(default=True, metadata={"help": "divide each report's log-prob by its length"})

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"scst.num_samples must be >= 1, got {self.num_samples}")
        if self.nll_weight < 0:
            raise ValueError(f"scst.nll_weight must be >= 0, got {self.nll_weight}")


def scst_update(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rollout: Rollout,
    advantages: torch.Tensor,
    cfg: SCSTConfig,
    temperature: float,
    grad_clip: float,
    nll_batch: dict[str, Any] | None = None,
) -> dict[str, float]:
    """One on-policy gradient step on the sampled reports.

    Args:
        accelerator: The stage's accelerator.
        model: The prepared :class:`rlhf_rrg.rl.policy.PolicyWithValue` (no value head needed).
        optimizer: Its optimizer.
        scheduler: Stepped once.
        rollout: ``b`` sampled responses.
        advantages: ``(b,)`` ``r(sampled) - r(greedy)``.
        cfg: SCST settings.
        temperature: Sampling temperature.
        grad_clip: Max gradient norm (0: off).
        nll_batch: The studies whose reference reports give the NLL term (required when ``cfg.nll_weight > 0``).

    Returns:
        ``policy_loss`` and, with the NLL term, ``nll``.
    """
    if cfg.nll_weight > 0 and nll_batch is None:
        raise ValueError("scst.nll_weight > 0 needs the batch of reference reports")
    out = model(rollout, temperature, nll_batch=nll_batch if cfg.nll_weight > 0 else None)
    policy_loss = scst_loss(out["logprobs"], rollout.response_mask, advantages, cfg.length_normalize)
    loss = policy_loss + cfg.nll_weight * out["nll"] if "nll" in out else policy_loss
    optimizer_step(accelerator, model, optimizer, scheduler, loss, grad_clip)
    stats = {"policy_loss": policy_loss.detach()}
    if "nll" in out:
        stats["nll"] = out["nll"].detach()
    return to_host(stats)
