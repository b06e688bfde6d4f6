"""Clue-consistent decoding: which candidate wins, and the settings' checks."""

import pytest
import torch

from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE, UNCERTAIN
from rlhf_rrg.models.disease_clues import DiseaseClueConfig
from rlhf_rrg.prompting.generator import PromptingConfig
from rlhf_rrg.prompting.rerank import ClueRerankConfig, choose, clue_disagreement

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


@pytest.mark.parametrize("kwargs, match", [({"candidates": -1}, "candidates"), ({"temperature": 0.0}, "temperature")])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClueRerankConfig(**kwargs)


def test_reranking_needs_the_clue_head():
    with pytest.raises(ValueError, match="clues.enabled"):
        PromptingConfig(rerank=ClueRerankConfig(candidates=4))
    PromptingConfig(rerank=ClueRerankConfig(candidates=4), clues=DiseaseClueConfig(enabled=True))
