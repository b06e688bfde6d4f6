"""Recall@K for image<->report retrieval, the standard check of a stage-2 alignment."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _hits_at_k(sims: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of rows whose top-k columns (by ``sims``) contain a relevant one, for each k."""
    order = sims.argsort(dim=1, descending=True)
    relevant_sorted = relevant.gather(1, order)
    # Rank (0-based) of the first relevant column in each row.
    first = relevant_sorted.float().argmax(dim=1)
    return {k: (first < k).float().mean().item() for k in ks}


def retrieval_recall_at_k(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    reports: Sequence[str] | None = None,
) -> dict[str, float]:
    """Image->report and report->image Recall@K of paired embeddings.

    Row ``i`` of ``image_emb`` and of ``text_emb`` come from the same study. Similarity is the dot product
    (cosine for unit-norm embeddings). Many chest X-ray reports are word-for-word identical ("no acute
    cardiopulmonary process"); with ``reports`` given, retrieving any report whose text equals the ground
    truth counts as a hit, in both directions.

    Args:
        image_emb: ``(n, d)`` image embeddings.
        text_emb: ``(n, d)`` report embeddings, paired row by row with ``image_emb``.
        ks: Cut-offs; each must be in ``[1, n]``.
        reports: Optional ``n`` report texts used to treat duplicates as correct.

    Returns:
        ``{"i2t_recall@k": ..., "t2i_recall@k": ...}`` for every ``k``, each in ``[0, 1]``.
    """
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"expected two (n, d) tensors of equal shape, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    n = image_emb.shape[0]
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"ks must lie in [1, n={n}], got {bad}")
    if reports is None:
        relevant = torch.eye(n, dtype=torch.bool)
    else:
        if len(reports) != n:
            raise ValueError(f"reports has {len(reports)} texts for {n} embeddings")
        index = {text: i for i, text in enumerate(dict.fromkeys(reports))}
        group = torch.tensor([index[text] for text in reports])
        relevant = group[:, None] == group[None, :]
    sims = image_emb.float() @ text_emb.float().T
    relevant = relevant.to(sims.device)
    i2t = _hits_at_k(sims, relevant, ks)
    # relevant is symmetric, so the same mask serves report->image.
    t2i = _hits_at_k(sims.T, relevant, ks)
    return {**{f"i2t_recall@{k}": v for k, v in i2t.items()}, **{f"t2i_recall@{k}": v for k, v in t2i.items()}}
