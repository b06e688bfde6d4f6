import pytest
import torch

from rlhf_rrg.retrieval.metrics import retrieval_recall_at_k

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
    }


def test_duplicate_reports_count_as_hits():
    # Reports 0 and 1 are the same text: image 1's top report (t0) is now correct.
    # Report 1 -> image ranking is i3 ("c"), i1 ("a"), ... so it is still rank 1.
    got = retrieval_recall_at_k(SIMS, TEXTS, ks=(1, 2), reports=["a", "a", "b", "c"])
    assert got["i2t_recall@1"] == 0.5
    assert got["i2t_recall@2"] == 0.75
    assert got["t2i_recall@1"] == 0.25


def test_duplicates_help_report_to_image_too():
    # Reports 2 and 3 share a text. Report 3's top image is i2 (0.4) and report 2's is i3 (0.7): both hit.
    got = retrieval_recall_at_k(SIMS, TEXTS, ks=(1,), reports=["a", "b", "c", "c"])
    assert got["t2i_recall@1"] == 0.75  # t0, t2, t3
    # Image 2's top report is t3 (0.4), image 3's is t2 (0.7): both carry the right text.
    assert got["i2t_recall@1"] == 0.75  # i0, i2, i3


def test_perfect_embeddings_give_full_recall():
    emb = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert set(retrieval_recall_at_k(emb, emb, ks=(1,)).values()) == {1.0}


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall_at_k(SIMS, TEXTS, ks=(5,))
    with pytest.raises(ValueError, match="reports"):
        retrieval_recall_at_k(SIMS, TEXTS, ks=(1,), reports=["a"])
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        retrieval_recall_at_k(SIMS, TEXTS[:3])
