"""Finding-aware sampling: weights by the rarest present observation, and the sampler that draws by them."""

import pytest
import torch

from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE, UNCERTAIN
from rlhf_rrg.data.sampling import finding_balanced_weights, study_weights
from rlhf_rrg.training import EpochBatchSampler, TrainConfig

CARD, EFF, NF = (CHEXPERT_14.index(o) for o in ("Cardiomegaly", "Pleural Effusion", "No Finding"))


def _codes(rows: list[dict[int, int]]) -> torch.Tensor:
    codes = torch.full((len(rows), 14), BLANK)
    for i, row in enumerate(rows):
        for col, code in row.items():
            codes[i, col] = code
    return codes


def test_weights_follow_the_rarest_present_observation():
    # 6 normal studies (one only by having nothing present), 3 with cardiomegaly, 1 with both findings.
    rows = [{NF: POSITIVE}] * 5 + [{CARD: NEGATIVE}] + [{CARD: POSITIVE}] * 2 + [{CARD: UNCERTAIN}]
    rows += [{CARD: POSITIVE, EFF: POSITIVE}]
    weights = finding_balanced_weights(_codes(rows), 1.0)
    # Counts: No Finding 6, Cardiomegaly 4, Effusion 1 -> 1/6, 1/4, and the rarer 1/1 for the last study.
    raw = torch.tensor([1 / 6] * 6 + [1 / 4] * 3 + [1.0], dtype=torch.float64)
    torch.testing.assert_close(weights, raw / raw.sum())
    uniform = finding_balanced_weights(_codes(rows), 0.0)
    torch.testing.assert_close(uniform, torch.full((10,), 0.1, dtype=torch.float64))
    # Class-balanced (power 1): normal and cardiomegaly-only studies get equal shares.
    assert weights[:6].sum() == pytest.approx(weights[6:9].sum() * 4 / 3)
    with pytest.raises(ValueError, match="power must be >= 0"):
        finding_balanced_weights(_codes(rows), -1.0)


def test_study_weights_need_labels_only_when_balancing():
    assert study_weights([None, None], 0.0) is None
    with pytest.raises(ValueError, match="needs CheXpert labels"):
        study_weights([{"Cardiomegaly": POSITIVE}, None], 0.5)
    weights = study_weights([{"Cardiomegaly": POSITIVE}, {}, {}], 1.0)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="balance_findings must be >= 0"):
        TrainConfig(balance_findings=-0.5)


def test_weighted_sampler_is_reproducible_per_epoch_and_draws_by_weight():
    data = list(range(100))
    weights = torch.full((100,), 1.0, dtype=torch.float64)
    weights[:5] = 19.0  # 5 rare studies hold half the mass

    def drawn(seed: int, epoch: int) -> list[int]:
        sampler = EpochBatchSampler(data, 10, seed, weights=weights / weights.sum())
        sampler.set_epoch(epoch)
        torch.rand(3)  # global RNG use in between must not matter
        return [i for batch in sampler for i in batch]

    first = drawn(0, 0)
    assert first == drawn(0, 0) and first != drawn(0, 1) and len(first) == 100
    rare_share = sum(i < 5 for epoch in range(10) for i in drawn(0, epoch)) / 1000
    assert 0.42 < rare_share < 0.58  # uniform shuffling gives exactly 0.05
    with pytest.raises(ValueError, match=r"weights must have shape \(100,\)"):
        EpochBatchSampler(data, 10, 0, weights=torch.ones(99))
