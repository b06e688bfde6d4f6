"""A report LM loss that weights the sentences stating a finding above the normal boilerplate.

Real reports spend most of their tokens on sentences every normal report shares ("the lungs are clear"), and each
finding is written once, in its own words ("streaky bibasilar opacities"). Under the plain token-mean cross-entropy
a small generator learns the boilerplate first and, decoding greedily, never leaves it, even when its prompt's
clue sentence names the finding. Here each report token inside a sentence that the CheXpert labeler reads as
stating a finding (positive or uncertain, support devices included, "No Finding" not) weighs ``finding_weight``,
every other token 1, and the loss is the weighted mean: ``sum(w * ce) / sum(w)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rewards.labeler import label_report
from rewards.observations import CHEXPERT_14, POSITIVE, UNCERTAIN
from rlhf_rrg.models.processor import IGNORE_INDEX

_SENTENCE_RE = re.compile(r"[^.!?\n]+[.!?]?")
_FINDING_COLUMNS = [i for i, obs in enumerate(CHEXPERT_14) if obs != "No Finding"]


def finding_spans(report: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``report`` that state a finding (positive or uncertain)."""
    spans = []
    for match in _SENTENCE_RE.finditer(report):
        codes = label_report(match.group())
        if any(codes[i] in (POSITIVE, UNCERTAIN) for i in _FINDING_COLUMNS):
            spans.append(match.span())
    return spans


def token_weights(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], weight: float,
                  ) -> list[float]:
    """``weight`` for each token whose character span overlaps one of ``spans``, else 1.0."""
    return [weight if any(s < end and start < e for s, e in spans) else 1.0 for start, end in offsets]


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted next-token cross-entropy.

    Args:
        logits: ``(b, L, V)`` model outputs.
        labels: ``(b, L)`` targets, ``-100`` where ignored (the model's convention: position t predicts t + 1).
        weights: ``(b, L)`` weight of each label position.

    Returns:
        Scalar ``sum(w * ce) / sum(w)`` over the positions that are not ignored.
    """
    logits, labels, weights = logits[:, :-1], labels[:, 1:], weights[:, 1:].to(logits.dtype)
    keep = labels != IGNORE_INDEX
    ce = F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")
    return (ce * weights[keep]).sum() / weights[keep].sum().clamp(min=1e-6)
