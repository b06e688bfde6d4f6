"""Retrieval metrics for image<->report alignment and the memory bank, each with the score of a random ranking.

Exact-pair Recall@K says whether a study's own report (or a word-for-word copy) is ranked near its image. When many
studies share their findings (most chest X-rays are normal, and templated reports vary only in wording), no image
can single out its own report among the reports that say the same thing, so Recall@K is printed next to its chance
level. The label-aware score asks the question retrieval is used for: do the top-k retrieved studies have the same
findings as the query? It is compared with what random retrieval scores on the same candidates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rewards.observations import CHEXPERT_14, POSITIVE

# Retrieved studies per query in the label-aware scores logged by align (validation) and SFT (memory bank).
LABEL_K = 5


def _hits_at_k(sims: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of rows whose top-k columns (by ``sims``) contain a relevant one, for each k."""
    order = sims.argsort(dim=1, descending=True)
    relevant_sorted = relevant.gather(1, order)
    # Rank (0-based) of the first relevant column in each row.
    first = relevant_sorted.float().argmax(dim=1)
    return {k: (first < k).float().mean().item() for k in ks}


def recall_chance(relevant: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Expected Recall@K of a uniformly random ranking.

    A row with ``r`` relevant columns out of ``n`` misses its top k with probability ``C(n - r, k) / C(n, k)``.

    Args:
        relevant: ``(q, n)`` bool, each row with at least one relevant column.
        ks: Cut-offs in ``[1, n]``.

    Returns:
        ``{k: mean over rows of 1 - C(n - r, k) / C(n, k)}``.
    """
    n = relevant.shape[1]
    counts = relevant.sum(dim=1).tolist()
    return {k: sum(1.0 - math.comb(n - r, k) / math.comb(n, k) for r in counts) / len(counts) for k in ks}


def positive_findings(labels: torch.Tensor) -> torch.Tensor:
    """``(n, 14)`` CheXpert label codes -> ``(n, 14)`` bool, true where the observation is positive.

    Only positives are compared: whether a report mentions a normal finding as negative or leaves it blank is
    wording, which an image cannot predict.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (n, 14), got shape {tuple(labels.shape)}")
    return labels == POSITIVE


def label_match_hits(
    sims: torch.Tensor,
    query_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, which of its top-k retrieved candidates have exactly its positive findings, and the fraction of
    all its allowed candidates that do (what a uniformly random retrieval of k scores in expectation).

    Args:
        sims: ``(q, n)`` similarities, higher is closer.
        query_labels: ``(q, 14)`` CheXpert label codes of the queries.
        candidate_labels: ``(n, 14)`` label codes of the candidates.
        k: Candidates retrieved per query; at most the number a query may retrieve.
        exclude: ``(q, n)`` bool, candidates a query must not retrieve (e.g. itself in leave-one-out retrieval).

    Returns:
        ``(hits, chance)``: ``(q, k)`` bool, in rank order, and ``(q,)`` float.
    """
    q, n = sims.shape
    if query_labels.shape[0] != q or candidate_labels.shape[0] != n:
        raise ValueError(f"sims {tuple(sims.shape)} does not match {query_labels.shape[0]} query and "
                         f"{candidate_labels.shape[0]} candidate label rows")
    allowed = torch.ones(q, n, dtype=torch.bool) if exclude is None else ~exclude.cpu()
    usable = int(allowed.sum(dim=1).min())
    if not 1 <= k <= usable:
        raise ValueError(f"k must lie in [1, {usable}] (the fewest candidates a query may retrieve), got {k}")
    query_pos = positive_findings(query_labels.cpu())
    cand_pos = positive_findings(candidate_labels.cpu())
    match = (query_pos[:, None, :] == cand_pos[None, :, :]).all(dim=-1)
    top = sims.float().cpu().masked_fill(~allowed, float("-inf")).topk(k, dim=1).indices
    chance = (match & allowed).sum(dim=1).float() / allowed.sum(dim=1).float()
    return match.gather(1, top), chance


def label_match_at_k(
    sims: torch.Tensor,
    query_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
) -> dict[str, float]:
    """Fraction of the top-k retrieved candidates whose positive findings equal the query's, and its chance level
    (the means of :func:`label_match_hits`).

    Returns:
        ``{"label_match@k": ..., "label_match@k_chance": ...}``.
    """
    hits, chance = label_match_hits(sims, query_labels, candidate_labels, k, exclude)
    return {f"label_match@{k}": hits.float().mean().item(), f"label_match@{k}_chance": chance.mean().item()}


def ratio_interval(
    numerator: torch.Tensor, denominator: torch.Tensor, level: float = 0.95, draws: int = 2000, seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(numerator) / mean(denominator)`` over queries resampled with
    replacement (e.g. label match over its chance level): how far the ratio could move on another sample of
    queries of the same kind, with the retrieval model fixed.

    Args:
        numerator: ``(q,)`` per-query values.
        denominator: ``(q,)`` per-query values, paired with ``numerator``.
        level: Central coverage of the interval.
        draws: Bootstrap resamples.
        seed: Seed of the resampling (the interval is reproducible).

    Returns:
        ``(low, high)``.
    """
    if numerator.shape != denominator.shape or numerator.dim() != 1 or len(numerator) == 0:
        raise ValueError(f"numerator and denominator must be equal non-empty (q,) tensors, got "
                         f"{tuple(numerator.shape)} and {tuple(denominator.shape)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    picks = torch.randint(0, len(numerator), (draws, len(numerator)), generator=torch.Generator().manual_seed(seed))
    ratios = numerator.double()[picks].mean(1) / denominator.double()[picks].mean(1)
    low, high = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return low.item(), high.item()


def finding_precision_at_k(
    sims: torch.Tensor, query_labels: torch.Tensor, candidate_labels: torch.Tensor, k: int,
) -> dict[str, dict[str, float]]:
    """Per observation, how often the top-k retrieved candidates state it, for queries with and without it.

    Exact-set :func:`label_match_at_k` counts every retrieval that misses one finding as wrong, so on a set where
    some findings cannot be seen (a rendered image draws no fracture) it stays near chance even when retrieval reads
    each visible finding well. This scores each finding on its own.

    Args:
        sims: ``(q, n)`` similarities, higher is closer.
        query_labels: ``(q, 14)`` CheXpert label codes of the queries.
        candidate_labels: ``(n, 14)`` label codes of the candidates.
        k: Candidates retrieved per query, at most ``n``.

    Returns:
        For each observation at least one query states (positives only): ``with`` (mean share of a positive query's
        top k that state it), ``without`` (the same over the other queries), ``base`` (share of all candidates that
        state it: what random retrieval gives both) and ``queries`` (how many state it).
    """
    if not 1 <= k <= sims.shape[1]:
        raise ValueError(f"k must lie in [1, {sims.shape[1]}], got {k}")
    query_pos = positive_findings(query_labels.cpu())
    cand_pos = positive_findings(candidate_labels.cpu()).float()
    retrieved = cand_pos[sims.float().cpu().topk(k, dim=1).indices].mean(dim=1)  # (q, 14) share of the top k
    scores = {}
    for j, name in enumerate(CHEXPERT_14):
        has = query_pos[:, j]
        if has.any():
            scores[name] = {"with": retrieved[has, j].mean().item(),
                            "without": retrieved[~has, j].mean().item() if (~has).any() else float("nan"),
                            "base": cand_pos[:, j].mean().item(), "queries": int(has.sum())}
    return scores


def leave_one_out_label_match(emb: torch.Tensor, labels: torch.Tensor, k: int) -> dict[str, float]:
    """:func:`label_match_at_k` of every row of ``emb (n, d)`` against all the other rows (cosine similarity)."""
    emb = torch.nn.functional.normalize(emb.float().cpu(), dim=-1)
    return label_match_at_k(emb @ emb.T, labels, labels, k, exclude=torch.eye(emb.shape[0], dtype=torch.bool))


def retrieval_recall_at_k(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    reports: Sequence[str] | None = None,
) -> dict[str, float]:
    """Image->report and report->image Recall@K of paired embeddings, with the chance level of each cut-off.

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
        ``{"i2t_recall@k": ..., "t2i_recall@k": ..., "recall@k_chance": ...}`` for every ``k``, each in ``[0, 1]``;
        the chance level (see :func:`recall_chance`) is the same in both directions.
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
    chance = recall_chance(relevant, ks)
    relevant = relevant.to(sims.device)
    i2t = _hits_at_k(sims, relevant, ks)
    # relevant is symmetric, so the same mask serves report->image.
    t2i = _hits_at_k(sims.T, relevant, ks)
    return {**{f"i2t_recall@{k}": v for k, v in i2t.items()}, **{f"t2i_recall@{k}": v for k, v in t2i.items()},
            **{f"recall@{k}_chance": v for k, v in chance.items()}}
