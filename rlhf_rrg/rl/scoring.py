"""The RL stage's reward: chosen purely by config, applied to rollouts with the empty/NaN policies of the loop."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from rewards import REGISTRY, CompositeReward, Reward, RewardOutput, build_reward_from_config, default_reward
from rewards.base import score_nonempty
from rewards.weights import WeightsNotFoundError
from rlhf_rrg.rl.monitors import text_statistics

logger = logging.getLogger(__name__)


class NonFiniteRewardError(RuntimeError):
    """A reward came back NaN or infinite; the state before the failing step was saved."""


@dataclass
class RewardConfig:
    funcs: list[Any] = field(default_factory=lambda: ["radcliq_v1"], metadata={
        "help": "registry names, dotted paths 'pkg.mod:fn' or {name, weight, kwargs} mappings; one registry name "
                "without weights falls back to the weight-free clinical_offline reward when its model weights "
                "are missing, unless reward.require_weights"})
    require_weights: bool = field(default=False, metadata={
        "help": "a model-based reward (e.g. radcliq_v1) whose weights are missing stops the stage before training, "
                "naming the missing files, instead of falling back to clinical_offline with a warning"})
    weights: list[float] | None = field(default=None, metadata={"help": "one weight per entry of funcs"})
    empty_reward: float | None = field(default=None, metadata={
        "help": "reward of empty reports; None uses the reward's own worst value (required for rewards without "
                "one, e.g. user functions)"})

    missing_eos_penalty: float = field(default=0.0, metadata={
        "help": "subtracted from the reward of sampled reports cut off at generation.max_new_tokens (no EOS)"})

    def __post_init__(self) -> None:
        if self.missing_eos_penalty < 0:
            raise ValueError(f"reward.missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}")
        if not self.funcs:
            raise ValueError("reward.funcs must name at least one reward")
        if self.weights is not None and len(self.weights) != len(self.funcs):
            raise ValueError(f"reward.weights has {len(self.weights)} entries for {len(self.funcs)} reward.funcs")


def build_stage_reward(
    funcs: list[Any], weights: list[float] | None, device: str = "cpu", require_weights: bool = False
) -> Reward:
    """The configured reward; a lone model-based registry name goes through :func:`rewards.default_reward`.

    Args:
        funcs: Reward specs (see :func:`rewards.build_reward`).
        weights: Their weights, or None.
        device: Device of model-based rewards.
        require_weights: load a model-based reward's weights now and fail if they are missing (no fallback).

    Raises:
        rewards.weights.WeightsNotFoundError: ``require_weights`` and a model's weights are missing (the message
            names the file and where it was searched).
    """
    reward = build_reward_from_config(funcs, weights)
    if require_weights and hasattr(reward, "load"):
        try:
            reward.load()
        except WeightsNotFoundError as err:
            raise WeightsNotFoundError(f"reward.require_weights is true and reward {reward.name!r} cannot load its "
                                       f"weights (set reward.require_weights false to fall back to the weight-free "
                                       f"clinical_offline reward): {err}") from None
    # Only model-based rewards (those with weights to load) have the weight-free fallback.
    elif len(funcs) == 1 and weights is None and funcs[0] in REGISTRY and hasattr(reward, "load") \
            and not isinstance(reward, CompositeReward):
        reward = default_reward(prefer=funcs[0], device=device)
    logger.info("reward: %s (configured %s)", reward.name, funcs)
    return reward


def empty_report_reward(reward: Reward, empty_reward: float | None) -> float:
    """The reward given to empty reports: the configured value, else the reward's ``worst``.

    Raises:
        ValueError: neither is available (names the config field to set).
    """
    if empty_reward is not None:
        return float(empty_reward)
    worst = getattr(reward, "worst", None)
    if worst is None:
        raise ValueError(f"reward {reward.name!r} defines no worst value for empty reports: set reward.empty_reward")
    return float(worst)


def score_reports(reward: Reward, reports: list[str], references: list[str], worst: float) -> RewardOutput:
    """Scores generated reports; empty (whitespace-only) ones get ``worst`` without reaching the reward.

    Raises:
        NonFiniteRewardError: some score is NaN or infinite (the offending report is named).
    """
    out = score_nonempty(reports, references, reward.score, worst)
    bad = [i for i, s in enumerate(out.scores) if not math.isfinite(s)]
    if bad:
        i = bad[0]
        raise NonFiniteRewardError(f"reward {reward.name!r} returned {out.scores[i]} for {len(bad)} of "
                                   f"{len(reports)} reports, e.g. {reports[i]!r} (reference {references[i]!r})")
    return out


def scores_tensor(out: RewardOutput, device: torch.device) -> torch.Tensor:
    """``(b,)`` float32 scores of a :class:`RewardOutput`."""
    return torch.tensor(out.scores, dtype=torch.float32, device=device)


def heldout_report_metrics(reward: Reward, predictions: list[str], references: list[str],
                           worst: float) -> dict[str, float]:
    """What RL adds to the usual scores of held-out greedy reports: their degeneration statistics (distinct-n,
    repeated sentences, length ratio) and their mean training reward."""
    out = score_reports(reward, predictions, references, worst)
    return {**text_statistics(predictions, references), "reward": sum(out.scores) / len(out.scores)}
