"""Form rewards: penalise degenerate text that clinical rewards cannot see.

A labeler-based reward scores "no focal consolidation. no focal consolidation. ..." exactly like one such sentence,
so a policy can pad or loop at no cost. ``distinct_sentences`` is the share of a report's sentences that are not
repeats (1.0 for a report without repetition): added to a clinical reward with a small weight, it makes repeating a
sentence cost reward. ``length_match`` is ``min(n / n_ref, n_ref / n)`` over word counts (1.0 at the reference's
length): RL on a clinical reward alone learned to drop the normal sentences a labeler does not score (a third of
every report on real IU X-ray prose), and this term makes a report that keeps its length pay.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rewards.base import RewardOutput, score_nonempty, trl_call

_SENTENCE_END = re.compile(r"[.!?;]+")


def sentences(text: str) -> list[str]:
    """Normalised sentences of a report (lowercase, single spaces, empty ones dropped)."""
    return [" ".join(s.split()) for s in _SENTENCE_END.split(text.lower()) if s.strip()]


class DistinctSentenceReward:
    """Distinct sentences / sentences of each report, in [0, 1] (references are not used)."""

    name = __name__ = "distinct_sentences"
    worst = 0.0

    def score(self, completions: Sequence[str], references: Sequence[str]) -> RewardOutput:
        return score_nonempty(completions, references, self._score, self.worst)

    @staticmethod
    def _score(hyps: list[str], refs: list[str]) -> RewardOutput:
        parts = [sentences(h) for h in hyps]
        return RewardOutput([len(set(p)) / len(p) if p else 0.0 for p in parts])

    __call__ = trl_call


class LengthMatchReward:
    """``min(n / n_ref, n_ref / n)`` of each report's word count ``n`` against its reference's, in [0, 1]."""

    name = __name__ = "length_match"
    worst = 0.0

    def score(self, completions: Sequence[str], references: Sequence[str]) -> RewardOutput:
        return score_nonempty(completions, references, self._score, self.worst)

    @staticmethod
    def _score(hyps: list[str], refs: list[str]) -> RewardOutput:
        counts = [(len(h.split()), len(r.split())) for h, r in zip(hyps, refs, strict=True)]
        return RewardOutput([min(n / m, m / n) if n and m else 0.0 for n, m in counts])

    __call__ = trl_call
