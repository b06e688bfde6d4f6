"""Reward-hacking monitors: text statistics of generated reports and a reward-vs-held-out-accuracy watchdog.

A policy that games its reward (e.g. repeating one negative sentence that a labeler-based reward likes) shows it
in the text before it shows it anywhere else: fewer distinct n-grams and reports, repeated sentences, a length
that drifts from the references'. :func:`text_statistics` measures those on every rollout batch and evaluation;
:class:`HackingMonitor` compares each evaluation with the previous one and warns when the reward rises while the
held-out clinical accuracy falls.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.form import sentences

logger = logging.getLogger(__name__)

def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of a batch of texts (Li et al. 2016); 0 when there are none."""
    grams = [g for text in texts for g in _ngrams(text.lower().split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def has_repeated_sentence(text: str) -> bool:
    """Whether any normalised sentence occurs twice in the report."""
    parts = sentences(text)
    return len(set(parts)) < len(parts)


def text_statistics(texts: Sequence[str], references: Sequence[str] | None = None) -> dict[str, float]:
    """Degeneration statistics of a batch of generated reports.

    Returns:
        ``distinct_1``, ``distinct_2`` (batch-level), ``repeated_sentence_rate`` (share of reports repeating a
        sentence), ``unique_reports`` (share of distinct reports), ``length`` (mean words), and with
        ``references`` also ``length_ratio`` (mean generated / mean reference length).
    """
    if not texts:
        raise ValueError("text_statistics needs at least one text")
    lengths = [len(t.split()) for t in texts]
    stats = {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repeated_sentence_rate": sum(map(has_repeated_sentence, texts)) / len(texts),
        "unique_reports": len(set(texts)) / len(texts),
        "length": sum(lengths) / len(lengths),
    }
    if references is not None:
        ref_length = sum(len(r.split()) for r in references) / max(len(references), 1)
        stats["length_ratio"] = stats["length"] / ref_length if ref_length else 0.0
    return stats


@dataclass
class MonitorConfig:
    """When the hacking watchdog warns."""

    metric: str = field(default="ce/micro_f1_14", metadata={"help": "held-out accuracy the reward must not trade"})
    tolerance: float = field(default=0.005, metadata={
        "help": "a fall of the held-out metric larger than this while the reward rises is flagged"})
    max_repeated_sentence_rate: float = field(default=0.2, metadata={
        "help": "share of evaluation reports repeating a sentence above which a warning is given"})
    length_ratio_range: tuple[float, float] = field(default=(0.7, 1.3), metadata={
        "help": "evaluation length / reference length outside this range is flagged"})

    def __post_init__(self) -> None:
        self.length_ratio_range = tuple(self.length_ratio_range)
        low, high = self.length_ratio_range
        if self.tolerance < 0 or not 0 <= self.max_repeated_sentence_rate <= 1 or not 0 < low < high:
            raise ValueError("monitor: tolerance >= 0, max_repeated_sentence_rate in [0, 1] and "
                             "0 < length_ratio_range[0] < length_ratio_range[1] are required")


class HackingMonitor:
    """Compares each evaluation with the previous one; a checkpointable object (its history rides along).

    Args:
        cfg: Thresholds.
    """

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg
        self.history: list[dict[str, float]] = []

    def check(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Records one evaluation (needs ``reward``, ``cfg.metric`` and :func:`text_statistics` keys).

        Returns:
            ``monitor/*`` flags (1.0 = suspicious): ``reward_up_metric_down``, ``repetition``, ``length``, plus
            ``reward_metric_gap``, the reward change minus the held-out metric change since the first evaluation.
        """
        flags = {
            "repetition": float(metrics.get("repeated_sentence_rate", 0.0) > self.cfg.max_repeated_sentence_rate),
            "length": float(not self.cfg.length_ratio_range[0] <= metrics.get("length_ratio", 1.0)
                            <= self.cfg.length_ratio_range[1]),
            "reward_up_metric_down": 0.0,
            "reward_metric_gap": 0.0,
        }
        if self.history:
            previous, first = self.history[-1], self.history[0]
            reward_up = metrics["reward"] > previous["reward"]
            metric_down = metrics[self.cfg.metric] < previous[self.cfg.metric] - self.cfg.tolerance
            flags["reward_up_metric_down"] = float(reward_up and metric_down)
            flags["reward_metric_gap"] = ((metrics["reward"] - first["reward"])
                                          - (metrics[self.cfg.metric] - first[self.cfg.metric]))
        self.history.append({"step": float(step), "reward": metrics["reward"],
                             self.cfg.metric: metrics[self.cfg.metric]})
        if flags["reward_up_metric_down"]:
            logger.warning("step %d: the reward rose (%.4f -> %.4f) while held-out %s fell (%.4f -> %.4f): the "
                           "policy may be gaming its reward", step, self.history[-2]["reward"], metrics["reward"],
                           self.cfg.metric, self.history[-2][self.cfg.metric], metrics[self.cfg.metric])
        if flags["repetition"]:
            logger.warning("step %d: %.0f%% of evaluation reports repeat a sentence", step,
                           100 * metrics["repeated_sentence_rate"])
        if flags["length"]:
            logger.warning("step %d: evaluation reports are %.2fx the references' length", step,
                           metrics["length_ratio"])
        return {f"monitor/{k}": v for k, v in flags.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
