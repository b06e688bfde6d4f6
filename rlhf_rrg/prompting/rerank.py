"""Clue-consistent decoding: of several reports the LLM writes for a study, keep the one that states what its clue
head sees.

A small LLM trained on real prose follows its clue sentence only part of the time: on IU X-ray reports its greedy
report states about half of the findings its TRRG clue head reads from the image. Here the deterministic report
(greedy or beam) and ``candidates`` sampled ones are labelled with the rule labeler (weight-free, so an export
decodes the same on any machine and its remote code carries no weights' paths), and the first report whose stated
findings differ from the head's statements on the fewest observations wins. Every candidate is the LLM's own text;
the head only chooses among them, as a reranker does in best-of-n decoding. "No Finding" is left out: it follows
from the others. The choice needs no reference, so it is the same at evaluation and at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rewards.observations import CHEXPERT_14, POSITIVE

_NO_FINDING = CHEXPERT_14.index("No Finding")


@dataclass
class ClueRerankConfig:
    """Best-of-n decoding by agreement with the clue head; saved with the export, so inference decodes the same."""

    candidates: int = field(default=0, metadata={
        "help": "Sampled reports per study next to the greedy (or beam) one; 0 turns reranking off."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the candidates."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the candidates' sampling, in a forked RNG: a batch's reports do not depend on what ran "
                "before it, and training's random streams are untouched."})

    def __post_init__(self) -> None:
        if self.candidates < 0:
            raise ValueError(f"rerank.candidates must be >= 0, got {self.candidates}")
        if self.temperature <= 0:
            raise ValueError(f"rerank.temperature must be > 0, got {self.temperature}")


def clue_disagreement(codes: torch.Tensor, clues: torch.Tensor) -> torch.Tensor:
    """Observations on which each candidate's stated findings differ from the clue head's statements.

    Args:
        codes: ``(b, n, 14)`` CheXpert codes of ``n`` candidates per study (positive = ``POSITIVE``).
        clues: ``(b, 14)`` bool, the observations the head states.

    Returns:
        ``(b, n)`` long: per candidate, the number of observations other than "No Finding" where it states a
        finding the head does not, or omits one the head states.
    """
    differ = (codes == POSITIVE) != clues[:, None, :].to(codes.device)
    differ[..., _NO_FINDING] = False
    return differ.sum(-1)


def choose(disagreement: torch.Tensor) -> torch.Tensor:
    """``(b,)`` index of each study's first candidate with the fewest disagreements (candidate 0, the deterministic
    report, wins every tie it is in). ``disagreement``: ``(b, n)`` from :func:`clue_disagreement`."""
    return disagreement.argmin(dim=-1)  # documented: the first of equal minima
