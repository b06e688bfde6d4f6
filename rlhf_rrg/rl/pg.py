"""Sequence-level policy gradient with a baseline: SCST, RLOO and GRPO in our own loop.

All three sample ``k`` reports per study and take one REINFORCE step ``L = -A * log p(report) / len`` on them;
they differ only in the baseline that turns rewards into advantages (:func:`advantages`):

- ``scst``: the greedy report of the same study (Rennie et al. 2017; Miura et al. 2021 / ViLMedic);
- ``rloo``: the mean reward of the study's other ``k - 1`` samples (Ahmadian et al. 2024);
- ``grpo``: the group mean, divided by the group std (Shao et al. 2024; with one update per batch the clipped
  ratio is 1, so GRPO's surrogate has this gradient).

With ``train_clues`` the TRRG clue sentence of each prompt is sampled from the clue head and is part of the action:
the head gets the same advantage times the log-probability of its sampled statements, so the reward teaches it
which findings to state (a linear head on frozen features: the same function class as a linear probe).

Optional terms: a per-token KL penalty to the frozen starting policy (GRPO's k3 estimator, ``kl_coef``) and the
teacher-forced NLL of the reference report (``nll_weight``) that keeps the policy fluent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from accelerate import Accelerator
from torch import nn

from rewards.clinical import Labeler
from rewards.observations import POSITIVE
from rlhf_rrg.rl.advantages import group_normalized_advantages, rloo_advantages, scst_advantages
from rlhf_rrg.rl.host_sync import to_host
from rlhf_rrg.rl.kl import kl_per_token
from rlhf_rrg.rl.losses import scst_loss
from rlhf_rrg.rl.masked import masked_mean
from rlhf_rrg.rl.ppo_step import optimizer_step
from rlhf_rrg.rl.rollout import Rollout

Baseline = Literal["scst", "rloo", "grpo"]


@dataclass
class PGConfig:
    """The REINFORCE-with-baseline update of ``algo: scst | rloo | grpo``."""

    nll_weight: float = field(default=0.0, metadata={"help": "weight of the reference-report NLL term"})
    length_normalize: bool = field(default=True, metadata={"help": "divide each report's log-prob by its length"})
    kl_coef: float = field(default=0.0, metadata={
        "help": "weight of the per-token k3 KL to the starting policy in the loss (0: no reference forward)"})
    train_clues: bool = field(default=False, metadata={
        "help": "sample each prompt's TRRG clue statements from the clue head (a Bernoulli per observation) and "
                "train the head with the same advantage: the clue sentence becomes part of the action"})
    clue_temperature: float = field(default=1.0, metadata={"help": "temperature of the sampled clue statements"})
    clue_weight: float = field(default=1.0, metadata={"help": "weight of the clue policy-gradient term"})
    clue_lr_scale: float = field(default=1.0, metadata={
        "help": "learning rate of the clue head as a multiple of optim.lr (a linear head moves little per step "
                "at an LLM's learning rate)"})
    clue_credit: Literal["report", "observation", "f1"] = field(default="observation", metadata={
        "help": "advantage of each sampled clue statement: the report's; per observation whether the report then "
                "states that observation as its reference does (CheXpert labeler; same baseline per column); or f1: "
                "per observation +1 for a finding stated rightly, -clue_false_positive_cost for one stated wrongly"})
    clue_false_positive_cost: float = field(default=0.5, metadata={
        "help": "clue_credit f1: the cost of stating an absent finding; stating pays when P(present) > cost / "
                "(1 + cost), 1/3 at 0.5, the micro-F1-optimal threshold when the best F1 is 2/3"})

    def __post_init__(self) -> None:
        if self.nll_weight < 0 or self.kl_coef < 0 or self.clue_weight < 0 or self.clue_lr_scale <= 0:
            raise ValueError(f"pg.nll_weight, pg.kl_coef, pg.clue_weight must be >= 0 and pg.clue_lr_scale > 0, got "
                             f"{self.nll_weight}, {self.kl_coef}, {self.clue_weight}, {self.clue_lr_scale}")
        if self.clue_temperature <= 0:
            raise ValueError(f"pg.clue_temperature must be > 0, got {self.clue_temperature}")
        if self.clue_credit not in ("report", "observation", "f1"):
            raise ValueError(f"pg.clue_credit must be 'report', 'observation' or 'f1', got {self.clue_credit!r}")
        if self.clue_false_positive_cost <= 0:
            raise ValueError(f"pg.clue_false_positive_cost must be > 0, got {self.clue_false_positive_cost}")


@torch.no_grad()
def advantages(baseline: Baseline, scores: torch.Tensor, k: int, greedy_scores: torch.Tensor | None = None,
               ) -> torch.Tensor:
    """``(b*k,)`` advantages of ``(b*k,)`` sample rewards (the ``k`` samples of a study adjacent).

    ``(b*k, m)`` scores (one reward per column, e.g. per observation) give ``(b*k, m)`` advantages, each column
    with its own baseline.

    Args:
        baseline: ``scst`` (needs ``greedy_scores (b,)`` / ``(b, m)``), ``rloo`` or ``grpo`` (need ``k >= 2``).
        scores: Sample rewards.
        k: Samples per study.
        greedy_scores: Rewards of each study's greedy report (SCST only).
    """
    if scores.dim() == 2:
        greedy_columns = greedy_scores.T if greedy_scores is not None else [None] * scores.shape[1]
        return torch.stack([advantages(baseline, column, k, greedy)
                            for column, greedy in zip(scores.T, greedy_columns, strict=True)], dim=1)
    if baseline == "scst":
        if greedy_scores is None:
            raise ValueError("the scst baseline needs the greedy reports' rewards")
        return scst_advantages(scores, greedy_scores.repeat_interleave(k))
    if baseline == "rloo":
        return rloo_advantages(scores, k)
    if baseline == "grpo":
        return group_normalized_advantages(scores, k)
    raise ValueError(f"baseline must be scst, rloo or grpo, got {baseline!r}")


@torch.no_grad()
def observation_agreement(labeler: Labeler, reports: Sequence[str], references: Sequence[str]) -> torch.Tensor:
    """``(n, 14)`` 1.0 where a report states an observation present exactly when its reference does (CE's
    positive-only convention), else 0.0: the per-observation reward of sampled clue statements.

    Per-observation accuracy: stating pays when P(present) > 1/2, which for rare findings states fewer than micro-F1
    would (see :func:`observation_f1_credit`)."""
    present = labeler.label(list(reports)) == POSITIVE
    return (present == (labeler.label(list(references)) == POSITIVE)).float()


@torch.no_grad()
def observation_f1_credit(labeler: Labeler, reports: Sequence[str], references: Sequence[str],
                          false_positive_cost: float) -> torch.Tensor:
    """``(n, 14)`` +1 where a report states an observation its reference states, ``-false_positive_cost`` where it
    states one its reference does not, 0 where it states none (CE's positive-only convention).

    Stating then pays when P(present) > cost / (1 + cost). Micro-F1's best threshold is half the best attainable F1
    (Lipton et al. 2014), so a cost of F / (2 - F) aims the clue statements at F1 rather than at accuracy."""
    stated = labeler.label(list(reports)) == POSITIVE
    present = labeler.label(list(references)) == POSITIVE
    return stated.float() * torch.where(present, 1.0, -false_positive_cost)


def clue_scores(cfg: PGConfig, labeler: Labeler, reports: Sequence[str], references: Sequence[str]) -> torch.Tensor:
    """``(n, 14)`` per-observation scores of sampled clue statements, as ``cfg.clue_credit`` (observation or f1)
    asks; :func:`advantages` turns them into per-observation advantages."""
    if cfg.clue_credit == "f1":
        return observation_f1_credit(labeler, reports, references, cfg.clue_false_positive_cost)
    return observation_agreement(labeler, reports, references)


def pg_update(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rollout: Rollout,
    advantage: torch.Tensor,
    cfg: PGConfig,
    temperature: float,
    grad_clip: float,
    ref_logprobs: torch.Tensor | None = None,
    nll_batch: dict[str, Any] | None = None,
    clue_advantage: torch.Tensor | None = None,
    train_llm: bool = True,
) -> dict[str, float]:
    """One on-policy gradient step on the sampled reports.

    Args:
        accelerator: The stage's accelerator.
        model: The prepared :class:`rlhf_rrg.rl.policy.PolicyWithValue` (no value head needed).
        optimizer: Its optimizer.
        scheduler: Stepped once.
        rollout: ``b`` sampled responses.
        advantage: ``(b,)`` from :func:`advantages`.
        cfg: Loss settings.
        temperature: Sampling temperature.
        grad_clip: Max gradient norm (0: off).
        ref_logprobs: ``(b, R)`` starting-policy log-probs (required when ``cfg.kl_coef > 0``).
        nll_batch: The studies whose reference reports give the NLL term (required when ``cfg.nll_weight > 0``).
        clue_advantage: ``(b, 14)`` per-observation advantages of sampled clues; default: ``advantage`` for all.
        train_llm: False when the LLM is fixed (``freeze_llm``): only the clue term is computed, without running
            the LLM over the responses (the KL and NLL terms, which only move the LLM, are skipped).

    Returns:
        ``policy_loss`` and, with those terms, ``clue_loss``, ``kl`` and ``nll``.
    """
    if train_llm and cfg.nll_weight > 0 and nll_batch is None:
        raise ValueError("pg.nll_weight > 0 needs the batch of reference reports")
    if train_llm and cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("pg.kl_coef > 0 needs the reference policy's log-probs")
    if not train_llm and rollout.clues is None:
        raise ValueError("with the LLM fixed only sampled clue statements can train: the rollout has none")
    out = model(rollout, temperature, nll_batch=nll_batch if train_llm and cfg.nll_weight > 0 else None,
                clue_temperature=cfg.clue_temperature, score_responses=train_llm)
    loss, stats = 0.0, {}
    if train_llm:
        loss = scst_loss(out["logprobs"], rollout.response_mask, advantage, cfg.length_normalize)
        stats["policy_loss"] = loss.detach()
    if "clue_logprobs" in out:
        credit = clue_advantage if clue_advantage is not None else advantage.unsqueeze(1)
        clue_loss = -(credit.detach().to(out["clue_logprobs"]) * out["clue_logprobs"]).mean()
        loss = loss + cfg.clue_weight * clue_loss
        stats["clue_loss"] = clue_loss.detach()
    if train_llm and cfg.kl_coef > 0:
        kl = masked_mean(kl_per_token(out["logprobs"], ref_logprobs, "k3"), rollout.response_mask)
        loss = loss + cfg.kl_coef * kl
        stats["kl"] = kl.detach()
    if "nll" in out:
        loss = loss + cfg.nll_weight * out["nll"]
        stats["nll"] = out["nll"].detach()
    optimizer_step(accelerator, model, optimizer, scheduler, loss, grad_clip)
    return to_host(stats)
