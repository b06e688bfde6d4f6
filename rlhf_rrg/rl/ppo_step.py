"""One PPO iteration after the rollout: targets (KL-penalised rewards, GAE) and the clipped minibatch updates.

Follows Ziegler et al. 2019 / Ouyang et al. 2022 as implemented in TRL's former ``PPOTrainer`` and torchtune's
``ppo_full_finetune_single_device``: per-token ``-beta * KL`` plus the sequence score on the last token, GAE
over the response, whitened advantages, then ``ppo_epochs`` passes of shuffled minibatches with the clipped
policy loss and ``vf_coef`` times the clipped value loss.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn

from rlhf_rrg.rl.advantages import gae_advantages, kl_penalized_rewards
from rlhf_rrg.rl.host_sync import to_host
from rlhf_rrg.rl.kl import KLEstimator
from rlhf_rrg.rl.losses import ppo_policy_loss, ppo_value_loss
from rlhf_rrg.rl.masked import masked_whiten
from rlhf_rrg.rl.rollout import Rollout
from rlhf_rrg.training import NonFiniteLossError


@dataclass
class PPOConfig:
    minibatch_size: int = field(default=4, metadata={"help": "responses per gradient step (per process)"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout batch"})
    clip_range: float = field(default=0.2, metadata={"help": "policy ratio clip epsilon"})
    clip_range_value: float = field(default=0.2, metadata={"help": "value clip epsilon"})
    gamma: float = field(default=1.0, metadata={"help": "discount over response tokens"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    whiten_rewards: bool = field(default=False, metadata={
        "help": "scale the per-token rewards of each batch to unit variance (mean kept) before GAE"})
    group_baseline: bool = field(default=True, metadata={
        "help": "with generation.num_samples > 1, subtract the study's other samples' mean score before GAE"})
    normalize_scores: bool = field(default=False, metadata={
        "help": "divide sequence scores by a running std and subtract the running mean (state is checkpointed)"})

    def __post_init__(self) -> None:
        for name in ("minibatch_size", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("clip_range", "clip_range_value"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ppo.{name} must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ppo.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.vf_coef < 0:
            raise ValueError(f"ppo.vf_coef must be >= 0, got {self.vf_coef}")


@dataclass
class PPOTargets:
    """Rollout-time quantities the update regresses on, all ``(b, R)`` and zero on padding."""

    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor


@torch.no_grad()
def ppo_targets(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator,
    gamma: float,
    lam: float,
    whiten_rewards: bool,
    token_rewards: torch.Tensor | None = None,
) -> PPOTargets:
    """Advantages and returns of a rollout batch.

    Args:
        scores: ``(b,)`` sequence rewards.
        logprobs: ``(b, R)`` policy log-probs at rollout time.
        ref_logprobs: ``(b, R)`` reference log-probs.
        values: ``(b, R)`` value-head outputs at rollout time.
        mask: ``(b, R)`` right-padded response mask.
        kl_coef: Current KL coefficient.
        estimator: Per-token KL estimator.
        gamma: Discount.
        lam: GAE lambda.
        whiten_rewards: Rescale the per-token rewards (mean kept, as TRL's ``whiten_rewards``).
        token_rewards: ``(b, R)`` dense rewards added on top (e.g. :mod:`rlhf_rrg.rl.sentence_credit`), or None.

    Returns:
        :class:`PPOTargets` with whitened advantages.
    """
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator)
    if token_rewards is not None:
        rewards = rewards + token_rewards.to(rewards.dtype) * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    return PPOTargets(logprobs, values, masked_whiten(advantages, mask), returns, kl)


def optimizer_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss: torch.Tensor,
    grad_clip: float,
) -> None:
    """Backward, clip, step; a NaN/inf loss on any process raises before any weight changes.

    Raises:
        NonFiniteLossError: the loss is not finite (the caller saves the state and re-raises).
    """
    if not bool(torch.isfinite(accelerator.gather(loss.detach().reshape(1))).all()):
        raise NonFiniteLossError(f"RL loss is {loss.item()}")
    accelerator.backward(loss)
    if grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def ppo_update(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rollout: Rollout,
    targets: PPOTargets,
    cfg: PPOConfig,
    temperature: float,
    grad_clip: float,
) -> dict[str, float]:
    """``cfg.ppo_epochs`` passes of shuffled minibatches over one rollout batch.

    Args:
        accelerator: The stage's accelerator.
        model: The prepared :class:`rlhf_rrg.rl.policy.PolicyWithValue` (with a value head).
        optimizer: Its optimizer.
        scheduler: Stepped once per minibatch.
        rollout: ``b`` responses; ``b`` must be a multiple of ``cfg.minibatch_size``.
        targets: From :func:`ppo_targets`.
        cfg: PPO hyperparameters.
        temperature: Sampling temperature.
        grad_clip: Max gradient norm (0: off).

    Returns:
        Means over all minibatches: ``policy_loss``, ``value_loss``, ``clipfrac``, ``vf_clipfrac``,
        ``approx_kl``, ``ratio_mean``.
    """
    b = rollout.prompt_ids.shape[0]
    if b % cfg.minibatch_size:
        raise ValueError(f"rollout batch {b} is not a multiple of ppo.minibatch_size={cfg.minibatch_size}")
    mask = rollout.response_mask
    stats: dict[str, list[torch.Tensor]] = defaultdict(list)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(b).to(mask.device)
        for start in range(0, b, cfg.minibatch_size):
            rows = order[start:start + cfg.minibatch_size]
            out = model(rollout.select(rows), temperature)
            policy_loss, policy_stats = ppo_policy_loss(out["logprobs"], targets.old_logprobs[rows],
                                                        targets.advantages[rows], mask[rows], cfg.clip_range)
            value_loss, value_stats = ppo_value_loss(out["values"], targets.old_values[rows], targets.returns[rows],
                                                     mask[rows], cfg.clip_range_value)
            optimizer_step(accelerator, model, optimizer, scheduler, policy_loss + cfg.vf_coef * value_loss,
                           grad_clip)
            stats["policy_loss"].append(policy_loss.detach())
            stats["value_loss"].append(value_loss.detach())
            for key, value in {**policy_stats, **value_stats}.items():
                stats[key].append(value)
    return to_host({key: torch.stack(values).mean() for key, values in stats.items()})
