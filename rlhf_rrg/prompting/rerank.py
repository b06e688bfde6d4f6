"""Clue-consistent decoding: of several reports the LLM writes for a study, keep the one that states what its clue
head sees.

A small LLM trained on real prose follows its clue sentence only part of the time: on IU X-ray reports its greedy
report states about half of the findings its TRRG clue head reads from the image. Here the deterministic report
(greedy or beam) and ``candidates`` sampled ones are labelled with the rule labeler (weight-free, so an export
decodes the same on any machine and its remote code carries no weights' paths), and the first report whose stated
findings differ from the head's statements on the fewest observations wins. Every candidate is the LLM's own text;
the head only chooses among them, as a reranker does in best-of-n decoding. "No Finding" is left out: it follows
from the others. The choice needs no reference, so it is the same at evaluation and at inference.

Each study's candidates are drawn with random streams of its own, seeded by its image, so a study decodes the same
alone or in any batch (:class:`PerStudySampling`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import LogitsProcessor

from rewards.observations import CHEXPERT_14, POSITIVE

_NO_FINDING = CHEXPERT_14.index("No Finding")


@dataclass
class ClueRerankConfig:
    """Best-of-n decoding by agreement with the clue head; saved with the export, so inference decodes the same."""

    candidates: int = field(default=0, metadata={
        "help": "Sampled reports per study next to the greedy (or beam) one; 0 turns reranking off."})
    tie_break: Literal["first", "consensus"] = field(default="first", metadata={
        "help": "Of the candidates that agree best with the clue head: 'first' (the deterministic report wins every "
                "tie it is in) or 'consensus' (the one most like the study's other candidates by mean ROUGE-L, as "
                "minimum-Bayes-risk decoding chooses)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the candidates."})
    top_k: int = field(default=50, metadata={
        "help": "Most likely tokens the candidates are sampled from (transformers' default); 0 keeps all."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the candidates' sampling, mixed with each study's image into streams of its own: a study's "
                "reports depend neither on its batch nor on what ran before, and training's random streams are "
                "untouched."})

    def __post_init__(self) -> None:
        if self.candidates < 0:
            raise ValueError(f"rerank.candidates must be >= 0, got {self.candidates}")
        if self.temperature <= 0:
            raise ValueError(f"rerank.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"rerank.top_k must be >= 0, got {self.top_k}")
        if self.tie_break not in ("first", "consensus"):
            raise ValueError(f"rerank.tie_break must be 'first' or 'consensus', got {self.tie_break!r}")


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


def choose(disagreement: torch.Tensor, agreement: torch.Tensor | None = None) -> torch.Tensor:
    """``(b,)`` index of each study's candidate with the fewest disagreements.

    Args:
        disagreement: ``(b, n)`` from :func:`clue_disagreement`.
        agreement: ``(b, n)`` from :func:`consensus`, or ``None``. Among equally few disagreements, the most
            consensual candidate wins; without it (or among equals) the first does, so candidate 0, the
            deterministic report, keeps every tie it is in.
    """
    if agreement is None:
        return disagreement.argmin(dim=-1)  # documented: the first of equal minima
    fewest = disagreement == disagreement.min(dim=-1, keepdim=True).values
    return agreement.masked_fill(~fewest, float("-inf")).argmax(dim=-1)  # documented: the first of equal maxima


def rouge_l(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1 of two token sequences (longest common subsequence; 0 when either is empty). Written here, not
    taken from ``rewards.nlg`` (pycocoevalcap), because this module travels in every export's remote code."""
    if not hypothesis or not reference:
        return 0.0
    row = [0] * (len(reference) + 1)
    for token in hypothesis:
        diagonal = 0
        for j, other in enumerate(reference):
            diagonal, row[j + 1] = row[j + 1], diagonal + 1 if token == other else max(row[j + 1], row[j])
    common = row[-1]
    return 2 * common / (len(hypothesis) + len(reference))


def consensus(candidates: Sequence[Sequence[str]]) -> torch.Tensor:
    """Each candidate's mean ROUGE-L F1 (lowercased words) to the other candidates of its study: the expected
    utility that minimum-Bayes-risk decoding maximises, with the samples standing in for the model's distribution.

    Args:
        candidates: ``b`` lists of ``n >= 2`` reports.

    Returns:
        ``(b, n)`` float.
    """
    out = []
    for row in candidates:
        words = [text.lower().split() for text in row]
        n = len(words)
        pair = [[0.0] * n for _ in range(n)]
        for a in range(n):
            for b in range(a + 1, n):
                pair[a][b] = pair[b][a] = rouge_l(words[a], words[b])
        out.append([sum(scores) / (n - 1) for scores in pair])
    return torch.tensor(out)


def study_seeds(pixel_values: torch.Tensor, seed: int, candidates: int) -> list[int]:
    """One seed per sampled candidate, from the study's image bytes, ``seed`` and the candidate's index.

    Args:
        pixel_values: ``(b, ...)`` the studies' query images, as the generator receives them.
        seed: ``rerank.seed``.
        candidates: samples per study.

    Returns:
        ``b * candidates`` 63-bit seeds, study-major (the row order of ``generate``'s ``num_return_sequences``).
    """
    seeds = []
    for image in pixel_values.detach().to("cpu", torch.float32).contiguous():
        study = hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest()
        for j in range(candidates):
            key = hashlib.blake2b(study + seed.to_bytes(8, "little", signed=True) + j.to_bytes(4, "little"),
                                  digest_size=8).digest()
            seeds.append(int.from_bytes(key, "little") >> 1)
    return seeds


class PerStudySampling(LogitsProcessor):
    """Temperature (and top-k) sampling in which every row draws from a random stream of its own.

    ``generate`` samples a whole batch from one stream, so a row's draws depend on the rows beside it. This
    processor draws each row's next token itself, by the Gumbel-max trick on ``top_k(scores) / temperature`` with
    the row's own generator, and leaves only that token finite, so ``generate(do_sample=True)`` then picks it with
    probability 1 whatever its own warpers do. Pass it after the processors that must see the raw scores (it is
    appended after ``generate``'s own, before the sampling warpers).

    Args:
        seeds: one per row of the generated batch (:func:`study_seeds`).
        temperature: > 0.
        top_k: most likely tokens kept before sampling; 0 keeps all.
    """

    def __init__(self, seeds: list[int], temperature: float, top_k: int = 0) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.seeds, self.temperature, self.top_k = seeds, temperature, top_k
        self._generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``scores``: ``(rows, vocab)``; returns them with ``-inf`` everywhere but each row's drawn token (0)."""
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"PerStudySampling has {len(self.seeds)} seeds for {scores.shape[0]} rows")
        if self._generators is None:
            self._generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        logits = scores.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        uniform = torch.stack([torch.rand(logits.shape[-1], generator=g, device=scores.device)
                               for g in self._generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(torch.finfo(uniform.dtype).tiny, 1.0)))
        drawn = (logits + gumbel).argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(-1, drawn, 0.0)
