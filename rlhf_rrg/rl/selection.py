"""Which evaluated policy an RL run exports: the best held-out score among the evaluations whose reports stay fluent.

RL can buy reward with fluency: on one machine PPO cut a third of every demo report and 22% of BLEU-4 for +0.04
CE-F1, and the length monitor only warned. Here every evaluation (the starting policy's included) is a candidate,
and a candidate is fluent when its greedy reports are

- as long as the references within ``length_band`` (``|length_ratio - 1| <= length_band``), or no further from
  them than the starting policy's, and
- no more often repeating a sentence than the starting policy's (plus ``repetition_slack``).

The fluent candidate with the highest ``metric`` (the mean training reward of its held-out reports by default) is
exported; the starting policy is always fluent, so an RL run that only degrades exports the policy it started from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class SelectConfig:
    """How the RL export is chosen among the evaluations (``train.eval_every`` sets how many there are)."""

    mode: Literal["best", "last"] = field(default="best", metadata={
        "help": "'best': the fluent evaluation with the highest select.metric (rlhf_rrg/rl/selection.py); "
                "'last': the final policy whatever it writes"})
    metric: str = field(default="reward", metadata={
        "help": "held-out evaluation key maximised (e.g. reward, ce/micro_f1_14)"})
    length_band: float = field(default=0.15, metadata={
        "help": "a fluent policy's reports are within this fraction of the references' length (or no further "
                "from it than the starting policy's)"})
    repetition_slack: float = field(default=0.0, metadata={
        "help": "a fluent policy repeats a sentence in at most the starting policy's share of reports plus this"})

    def __post_init__(self) -> None:
        if self.mode not in ("best", "last"):
            raise ValueError(f"select.mode must be 'best' or 'last', got {self.mode!r}")
        if self.length_band < 0 or self.repetition_slack < 0:
            raise ValueError(f"select.length_band and select.repetition_slack must be >= 0, got "
                             f"{self.length_band}, {self.repetition_slack}")


def is_fluent(metrics: dict[str, float], start: dict[str, float], cfg: SelectConfig) -> bool:
    """Whether an evaluation's reports are as fluent as the rules above ask, against the starting policy's."""
    allowed_drift = max(cfg.length_band, abs(start["length_ratio"] - 1.0))
    return (abs(metrics["length_ratio"] - 1.0) <= allowed_drift
            and metrics["repeated_sentence_rate"] <= start["repeated_sentence_rate"] + cfg.repetition_slack)


class ExportSelector:
    """``select.mode: best``: offered every evaluation in order (the first is the starting policy's), says which
    ones to export.
    Checkpointable, so a resumed run keeps comparing against what it already exported."""

    def __init__(self, cfg: SelectConfig) -> None:
        self.cfg = cfg
        self.start: dict[str, float] | None = None
        self.best: dict[str, float] | None = None  # {"step", "score"} of the exported evaluation

    def offer(self, step: int, metrics: dict[str, float]) -> bool:
        """Records an evaluation; True when its policy should replace the export.

        Raises:
            KeyError: ``metrics`` lacks ``select.metric``, ``length_ratio`` or ``repeated_sentence_rate``.
        """
        if self.cfg.metric not in metrics:
            raise KeyError(f"select.metric {self.cfg.metric!r} is not an evaluation key; choose one of "
                           f"{sorted(metrics)}")
        if self.start is None:
            self.start = {k: metrics[k] for k in ("length_ratio", "repeated_sentence_rate")}
        score = metrics[self.cfg.metric]
        chosen = is_fluent(metrics, self.start, self.cfg) and (self.best is None or score > self.best["score"])
        if chosen:
            self.best = {"step": float(step), "score": float(metrics[self.cfg.metric])}
        return chosen

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start, self.best = state["start"], state["best"]
