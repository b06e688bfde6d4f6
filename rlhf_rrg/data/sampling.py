"""Finding-aware sampling: draw training studies so that rare findings are not drowned by normal reports.

Half of IU X-ray's reports are normal and most pathologies appear in 1-10% of studies. Trained on uniform batches,
a small report generator learns the most common normal report first and may never leave it. Each study is drawn
with weight ``count(rarest observation it has) ** -power``: 0 is uniform, 1 gives every observation's studies about
the same share of the batches (class-balanced by the rarest label, as in long-tail re-sampling), 0.5 is between.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rewards.observations import CHEXPERT_14, POSITIVE, UNCERTAIN

_NO_FINDING = CHEXPERT_14.index("No Finding")


def finding_balanced_weights(labels: torch.Tensor, power: float) -> torch.Tensor:
    """Per-study sampling weights from CheXpert label codes.

    An observation counts as present when positive or uncertain; a study with nothing present counts as
    "No Finding".

    Args:
        labels: ``(n, 14)`` codes in CHEXPERT_14 order.
        power: exponent of the inverse count, >= 0.

    Returns:
        ``(n,)`` float64 weights summing to 1.
    """
    if labels.dim() != 2 or labels.shape[1] != len(CHEXPERT_14):
        raise ValueError(f"labels must be (n, {len(CHEXPERT_14)}), got {tuple(labels.shape)}")
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    present = (labels == POSITIVE) | (labels == UNCERTAIN)
    present[:, _NO_FINDING] |= ~present.any(dim=1)
    counts = present.sum(0).double()
    per_label = torch.where(counts > 0, counts.clamp(min=1) ** -power, 0.0)
    weights = (present.double() * per_label).amax(dim=1)
    return weights / weights.sum()


def study_weights(labels: Sequence[dict[str, int] | None], power: float) -> torch.Tensor | None:
    """:func:`finding_balanced_weights` of a split's label dicts; None when ``power`` is 0 (uniform shuffling).

    Raises:
        ValueError: ``power`` > 0 and a study has no labels.
    """
    if power == 0:
        return None
    if any(row is None for row in labels):
        raise ValueError("finding-balanced sampling needs CheXpert labels for every training study")
    codes = torch.tensor([[row.get(obs, 0) for obs in CHEXPERT_14] for row in labels], dtype=torch.long)
    return finding_balanced_weights(codes, power)
