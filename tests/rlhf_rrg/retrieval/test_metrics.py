import pytest
import torch

from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE
from rlhf_rrg.retrieval.metrics import (
    finding_precision_at_k,
    label_match_at_k,
    label_match_hits,
    leave_one_out_label_match,
    ratio_interval,
    recall_chance,
    retrieval_recall_at_k,
)

# With text embeddings = identity, image_emb @ text_emb.T is this matrix itself: row i = image i's
# similarity to reports 0..3. Ranks of the true pair, worked out by hand:
#   image->report: i0 rank 0, i1 rank 1 (0.8 > 0.3), i2 rank 1 (0.4 > 0.3), i3 rank 3.
#   report->image (columns): t0 rank 0, t1 rank 1 (0.6 > 0.3), t2 rank 1 (0.7 > 0.3), t3 rank 1 (0.4 > 0.15).
SIMS = torch.tensor(
    [
        [0.9, 0.1, 0.0, 0.0],
        [0.8, 0.3, 0.2, 0.1],
        [0.1, 0.2, 0.3, 0.4],
        [0.5, 0.6, 0.7, 0.15],
    ]
)
TEXTS = torch.eye(4)


def test_recall_by_hand():
    got = retrieval_recall_at_k(SIMS, TEXTS, ks=(1, 2, 4))
    assert got == {
        "i2t_recall@1": 0.25,
        "i2t_recall@2": 0.75,
        "i2t_recall@4": 1.0,
        "t2i_recall@1": 0.25,
        "t2i_recall@2": 1.0,
        "t2i_recall@4": 1.0,
        # One relevant report out of 4: chance is k / 4.
        "recall@1_chance": 0.25,
        "recall@2_chance": 0.5,
        "recall@4_chance": 1.0,
    }


def test_duplicate_reports_count_as_hits():
    # Reports 0 and 1 are the same text: image 1's top report (t0) is now correct.
    # Report 1 -> image ranking is i3 ("c"), i1 ("a"), ... so it is still rank 1.
    got = retrieval_recall_at_k(SIMS, TEXTS, ks=(1, 2), reports=["a", "a", "b", "c"])
    assert got["i2t_recall@1"] == 0.5
    assert got["i2t_recall@2"] == 0.75
    assert got["t2i_recall@1"] == 0.25
    # Rows 0 and 1 have 2 relevant reports of 4 (a random top-1 hits with 1/2, a random top-2 misses only when it
    # picks both others: 1 - 1/6), rows 2 and 3 have one (1/4 and 1/2).
    assert got["recall@1_chance"] == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
    assert got["recall@2_chance"] == pytest.approx((5 / 6 + 5 / 6 + 0.5 + 0.5) / 4)


def test_duplicates_help_report_to_image_too():
    # Reports 2 and 3 share a text. Report 3's top image is i2 (0.4) and report 2's is i3 (0.7): both hit.
    got = retrieval_recall_at_k(SIMS, TEXTS, ks=(1,), reports=["a", "b", "c", "c"])
    assert got["t2i_recall@1"] == 0.75  # t0, t2, t3
    # Image 2's top report is t3 (0.4), image 3's is t2 (0.7): both carry the right text.
    assert got["i2t_recall@1"] == 0.75  # i0, i2, i3


def test_perfect_embeddings_give_full_recall():
    emb = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    got = retrieval_recall_at_k(emb, emb, ks=(1,))
    assert got["i2t_recall@1"] == got["t2i_recall@1"] == 1.0
    assert got["recall@1_chance"] == pytest.approx(1 / 6)


def test_recall_chance_by_hand():
    # n = 5; a row with r = 2 relevant misses a random top-2 with C(3, 2) / C(5, 2) = 3 / 10.
    relevant = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    got = recall_chance(relevant, (1, 2, 5))
    assert got[1] == pytest.approx((2 / 5 + 1 / 5) / 2)
    assert got[2] == pytest.approx((7 / 10 + 2 / 5) / 2)
    assert got[5] == pytest.approx(1.0)


def labels(*positives: set[int], negated: int | None = None):
    """(n, 14) codes: POSITIVE at the given observations, NEGATIVE at ``negated``, BLANK elsewhere."""
    out = torch.full((len(positives), 14), BLANK)
    for row, pos in enumerate(positives):
        out[row, list(pos)] = POSITIVE
        if negated is not None and negated not in pos:
            out[row, negated] = NEGATIVE
    return out


def test_label_match_by_hand():
    # Queries: A = {2}, B = {} (normal). Candidates: {2}, {2} with obs 5 negated (same positives), {3}, {}.
    query = labels({2}, set())
    cands = torch.cat([labels({2}), labels({2}, negated=5), labels({3}, set())])
    sims = torch.tensor([[0.9, 0.1, 0.8, 0.0],   # top-2: c0 (match), c2 (no) -> 1/2
                         [0.0, 0.5, 0.2, 0.3]])  # top-2: c1 (no), c3 (match) -> 1/2
    got = label_match_at_k(sims, query, cands, k=2)
    assert got["label_match@2"] == pytest.approx(0.5)
    # Random retrieval: A matches 2 of 4 candidates, B 1 of 4.
    assert got["label_match@2_chance"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    # Excluding c0 for A: its top-2 become c2, c1 (1/2), and its chance 1/3.
    exclude = torch.tensor([[True, False, False, False], [False, False, False, False]])
    got = label_match_at_k(sims, query, cands, k=2, exclude=exclude)
    assert got["label_match@2"] == pytest.approx(0.5)
    assert got["label_match@2_chance"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    with pytest.raises(ValueError, match="k must lie"):
        label_match_at_k(sims, query, cands, k=4, exclude=exclude)
    with pytest.raises(ValueError, match="does not match"):
        label_match_at_k(sims, query[:1], cands, k=1)
    # Per query, in rank order: A's c0 matches and c2 does not, B's c1 does not and c3 does.
    hits, chance = label_match_hits(sims, query, cands, k=2)
    assert hits.tolist() == [[True, False], [False, True]]
    torch.testing.assert_close(chance, torch.tensor([2 / 4, 1 / 4]))


def test_finding_precision_scores_each_finding_where_exact_sets_miss():
    # Queries: A = {2, 7} (7 unseeable), B = {2}, C = {}. Candidates: {2}, {2}, {7}, {}.
    query = labels({2, 7}, {2}, set())
    cands = labels({2}, {2}, {7}, set())
    sims = torch.tensor([[0.9, 0.8, 0.0, 0.1],   # top-2: c0, c1 -> finding 2 in 2/2, finding 7 in 0/2
                         [0.1, 0.9, 0.0, 0.8],   # c1, c3 -> finding 2 in 1/2
                         [0.0, 0.9, 0.0, 0.8]])  # c1, c3 -> finding 2 in 1/2
    got = finding_precision_at_k(sims, query, cands, k=2)
    two, seven = CHEXPERT_14[2], CHEXPERT_14[7]
    assert got[two] == pytest.approx({"with": (1 + 0.5) / 2, "without": 0.5, "base": 0.5, "queries": 2})
    assert got[seven] == pytest.approx({"with": 0.0, "without": 0.0, "base": 0.25, "queries": 1})
    assert set(got) == {two, seven}  # observations no query states are left out
    # A's exact set {2, 7} is matched by no candidate, although its visible finding is retrieved every time.
    assert label_match_at_k(sims[:1], query[:1], cands, k=2)["label_match@2"] == 0.0
    with pytest.raises(ValueError, match="k must lie"):
        finding_precision_at_k(sims, query, cands, k=5)


def test_leave_one_out_never_retrieves_itself():
    # Rows 0 and 1 share findings but point apart; row 2 (other findings) sits next to row 0.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    got = leave_one_out_label_match(emb, labels({1}, {1}, {4}), k=1)
    # Row 0 -> row 2 (miss), row 1 -> row 2 (miss, 0.1 > 0), row 2 -> row 0 (miss); the self match never counts.
    assert got["label_match@1"] == 0.0
    assert got["label_match@1_chance"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall_at_k(SIMS, TEXTS, ks=(5,))
    with pytest.raises(ValueError, match="reports"):
        retrieval_recall_at_k(SIMS, TEXTS, ks=(1,), reports=["a"])
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        retrieval_recall_at_k(SIMS, TEXTS[:3])


def test_ratio_interval_holds_the_ratio_and_narrows_with_more_queries():
    generator = torch.Generator().manual_seed(0)
    match = (torch.rand(60, generator=generator) < 0.4).float()
    chance = torch.rand(60, generator=generator) * 0.4 + 0.1
    ratio = match.mean() / chance.mean()
    low, high = ratio_interval(match, chance)
    assert low < ratio < high
    assert ratio_interval(match, chance) == (low, high)  # seeded: reproducible
    # Eight times as many queries of the same kind: about sqrt(8) = 2.8x narrower.
    many_low, many_high = ratio_interval(match.repeat(8), chance.repeat(8))
    assert 2 < (high - low) / (many_high - many_low) < 4
    # A split whose queries all score alike has nothing to resample.
    assert ratio_interval(torch.full((5,), 0.4), torch.full((5,), 0.2)) == pytest.approx((2.0, 2.0))
    with pytest.raises(ValueError, match="equal non-empty"):
        ratio_interval(match, chance[:-1])
    with pytest.raises(ValueError, match="level"):
        ratio_interval(match, chance, level=1.0)


def test_ratio_interval_covers_the_population_ratio_about_as_often_as_it_says():
    # Queries drawn from a population whose ratio is known: 0.3 matching over a chance of 0.2 is 1.5.
    generator = torch.Generator().manual_seed(1)
    covered = []
    for trial in range(100):
        match = (torch.rand(150, generator=generator) < 0.3).float()
        chance = 0.1 + 0.2 * torch.rand(150, generator=generator)  # mean 0.2
        low, high = ratio_interval(match, chance, draws=400, seed=trial)
        covered.append(low <= 1.5 <= high)
    assert 0.88 <= sum(covered) / len(covered) <= 1.0
