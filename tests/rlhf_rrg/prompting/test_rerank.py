"""Clue-consistent decoding: which candidate wins, how candidates are sampled per study, and the settings' checks."""

import pytest
import torch

from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE, UNCERTAIN
from rlhf_rrg.models.disease_clues import DiseaseClueConfig
from rlhf_rrg.prompting.generator import PromptingConfig
from rlhf_rrg.prompting.rerank import (
    ClueRerankConfig,
    PerStudySampling,
    choose,
    clue_disagreement,
    consensus,
    rouge_l,
    study_seeds,
)

CARDIO, EDEMA, NO_FINDING = (CHEXPERT_14.index(o) for o in ("Cardiomegaly", "Edema", "No Finding"))


def codes(*rows: dict[int, int]) -> torch.Tensor:
    out = torch.full((len(rows), len(CHEXPERT_14)), BLANK, dtype=torch.long)
    for i, row in enumerate(rows):
        for obs, code in row.items():
            out[i, obs] = code
    return out


def test_disagreement_counts_missed_and_unseen_findings_but_not_no_finding():
    clues = torch.zeros(1, len(CHEXPERT_14), dtype=torch.bool)
    clues[0, CARDIO] = True
    candidates = codes(
        {CARDIO: POSITIVE, NO_FINDING: POSITIVE},  # states the clue; No Finding is ignored
        {EDEMA: POSITIVE},  # misses cardiomegaly and adds edema
        {CARDIO: NEGATIVE, EDEMA: UNCERTAIN},  # only a positive mention states a finding (CE's rule)
        {},
    )[None]
    assert clue_disagreement(candidates, clues).tolist() == [[0, 2, 1, 1]]


def test_the_first_of_equal_candidates_wins_so_the_deterministic_report_keeps_its_ties():
    assert choose(torch.tensor([[1, 1, 0, 0], [2, 2, 3, 2], [0, 1, 0, 0]])).tolist() == [2, 0, 0]


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence():
    assert rouge_l("the heart is normal".split(), "the heart size is normal".split()) == pytest.approx(2 * 4 / 9)
    assert rouge_l("a b".split(), "b a".split()) == 0.5
    assert rouge_l([], ["a"]) == rouge_l(["a"], []) == 0.0
    assert rouge_l("x y".split(), "x y".split()) == 1.0


def test_consensus_breaks_only_the_ties_among_the_fewest_disagreements():
    reports = [["heart normal", "lungs clear", "heart normal lungs clear", "effusion"]]
    agreement = consensus(reports)
    # The third report shares most with the others; the fourth shares nothing.
    assert agreement.argmax().item() == 2 and agreement[0, 3] == 0
    assert agreement[0, 0] == pytest.approx((0 + 2 * 2 / 6 + 0) / 3)
    assert choose(torch.tensor([[1, 0, 1, 0]]), agreement).tolist() == [1]  # 2 agrees less with the clue head
    assert choose(torch.tensor([[0, 0, 0, 0]]), agreement).tolist() == [2]
    first_of_equals = choose(torch.tensor([[0, 0, 1, 0]]), torch.tensor([[0.5, 0.5, 0.9, 0.1]]))
    assert first_of_equals.tolist() == [0]


@pytest.mark.parametrize("kwargs, match", [({"candidates": -1}, "candidates"), ({"temperature": 0.0}, "temperature"),
                                           ({"top_k": -1}, "top_k"), ({"tie_break": "longest"}, "tie_break")])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClueRerankConfig(**kwargs)


def test_reranking_needs_the_clue_head():
    with pytest.raises(ValueError, match="clues.enabled"):
        PromptingConfig(rerank=ClueRerankConfig(candidates=4))
    PromptingConfig(rerank=ClueRerankConfig(candidates=4), clues=DiseaseClueConfig(enabled=True))


def test_per_study_sampling_draws_from_the_tempered_top_k_distribution():
    scores = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    temperature, top_k, n = 0.7, 3, 6000
    counts = torch.zeros(5)
    for seed in range(n):
        out = PerStudySampling([seed], temperature, top_k)(torch.zeros(1, 1, dtype=torch.long), scores)
        finite = torch.isfinite(out[0])
        assert int(finite.sum()) == 1 and float(out[0][finite]) == 0.0  # generate's own sampling has one choice
        counts[finite] += 1
    expected = torch.softmax(scores[0, :top_k] / temperature, -1)
    assert counts[top_k:].sum() == 0  # outside the top k: never
    # Binomial standard error at n = 6000 is at most 0.0065: four of them.
    assert torch.allclose(counts[:top_k] / n, expected, atol=0.026)
    all_kept = sum(int(PerStudySampling([s], 5.0)(None, scores)[0, 4] == 0) for s in range(2000))
    assert all_kept > 0  # top_k 0 keeps every token


def test_a_rows_draws_depend_only_on_its_own_seed():
    torch.manual_seed(0)
    steps = [torch.randn(3, 50) for _ in range(8)]
    batch, alone = PerStudySampling([11, 22, 33], 1.0), PerStudySampling([22], 1.0)
    drawn_in_batch = [batch(None, step).argmax(-1)[1] for step in steps]
    drawn_alone = [alone(None, step[1:2]).argmax(-1)[0] for step in steps]
    assert drawn_in_batch == drawn_alone
    state = torch.get_rng_state()
    PerStudySampling([1], 1.0)(None, steps[0][:1])
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is not drawn from
    with pytest.raises(ValueError, match="2 seeds for 3 rows"):
        PerStudySampling([1, 2], 1.0)(None, steps[0])


def test_study_seeds_follow_the_image_the_seed_and_the_candidate_not_the_batch():
    images = torch.randn(3, 1, 3, 8, 8)
    seeds = study_seeds(images, seed=0, candidates=2)
    assert len(seeds) == 6 and len(set(seeds)) == 6 and all(0 <= s < 2**63 for s in seeds)
    assert study_seeds(images[[2, 0]], seed=0, candidates=2) == seeds[4:6] + seeds[0:2]
    assert study_seeds(images[:1], seed=0, candidates=3)[:2] == seeds[:2]
    assert set(study_seeds(images, seed=1, candidates=2)).isdisjoint(seeds)
