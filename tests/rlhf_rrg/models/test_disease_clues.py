import math

import pytest
import torch

from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE, UNCERTAIN
from rlhf_rrg.models.disease_clues import DiseaseClueConfig, DiseaseClueHead, clue_bce_loss, clue_targets, clue_text

CARDIOMEGALY = CHEXPERT_14.index("Cardiomegaly")
EFFUSION = CHEXPERT_14.index("Pleural Effusion")
NO_FINDING = CHEXPERT_14.index("No Finding")


def bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def one_row(codes: dict[int, int]) -> torch.Tensor:
    labels = torch.full((1, 14), BLANK, dtype=torch.long)
    for idx, code in codes.items():
        labels[0, idx] = code
    return labels


def test_bce_by_hand_for_each_uncertain_policy():
    # Four informative entries; the other 10 are blank (negative target) with logit 0 -> log 2 each.
    labels = one_row({0: POSITIVE, 1: NEGATIVE, 2: UNCERTAIN, 3: BLANK})
    logits = torch.zeros(1, 14)
    logits[0, :4] = torch.tensor([2.0, -1.0, 0.5, 3.0])
    blanks = 10 * math.log(2)
    common = bce(2.0, 1) + bce(-1.0, 0) + bce(3.0, 0) + blanks

    as_positive = (common + bce(0.5, 1)) / 14
    as_negative = (common + bce(0.5, 0)) / 14
    ignored = common / 13
    assert clue_bce_loss(logits, labels, "positive").item() == pytest.approx(as_positive, rel=1e-6)
    assert clue_bce_loss(logits, labels, "negative").item() == pytest.approx(as_negative, rel=1e-6)
    assert clue_bce_loss(logits, labels, "ignore").item() == pytest.approx(ignored, rel=1e-6)


def test_targets_treat_blank_as_negative():
    labels = torch.tensor([[BLANK, POSITIVE, NEGATIVE, UNCERTAIN] + [BLANK] * 10])
    targets, keep = clue_targets(labels, "ignore")
    assert targets[0, :4].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert keep[0, :4].tolist() == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="codes 0..3"):
        clue_targets(torch.full((1, 14), 5), "ignore")


def test_all_ignored_gives_zero_with_gradient():
    logits = torch.randn(2, 14, requires_grad=True)
    loss = clue_bce_loss(logits, torch.full((2, 14), UNCERTAIN), "ignore")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 14))


def test_head_shapes_and_learning():
    torch.manual_seed(0)
    for hidden in (0, 16):
        head = DiseaseClueHead(in_dim=8, hidden_dim=hidden, dropout=0.0)
        assert head(torch.randn(3, 8)).shape == (3, 14)
    # A linear head learns a separable label: feature 0 > 0 <=> cardiomegaly (with a margin that
    # survives the head's LayerNorm).
    head = DiseaseClueHead(in_dim=8, dropout=0.0)
    features = torch.randn(64, 8)
    features[:, 0] = 3 * features[:, 0].sign()
    labels = torch.full((64, 14), NEGATIVE)
    labels[:, CARDIOMEGALY] = torch.where(features[:, 0] > 0, POSITIVE, NEGATIVE)
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        clue_bce_loss(head(features), labels).backward()
        opt.step()
    predicted = torch.sigmoid(head(features))[:, CARDIOMEGALY] > 0.5
    assert (predicted == (features[:, 0] > 0)).float().mean() > 0.95


@pytest.mark.parametrize("hidden", [0, 8])
def test_the_readout_reads_the_normalised_features(hidden):
    torch.manual_seed(0)
    head = DiseaseClueHead(6, hidden, dropout=0.5).eval()
    pooled = torch.randn(3, 6)
    inputs = head.readout_inputs(pooled)
    assert inputs.shape == (3, hidden or 6) and head.readout.weight.shape == (14, hidden or 6)
    torch.testing.assert_close(head(pooled), inputs @ head.readout.weight.T + head.readout.bias)


def test_clue_text():
    probs = torch.zeros(14)
    probs[EFFUSION], probs[CARDIOMEGALY], probs[NO_FINDING] = 0.9, 0.6, 0.7
    assert clue_text(probs, 0.5) == "findings suggest: cardiomegaly, pleural effusion"
    assert clue_text(probs, 0.8) == "findings suggest: pleural effusion"
    assert clue_text(probs, 0.95) == "findings suggest: no finding"
    assert clue_text(probs, 0.5, prefix="") == "cardiomegaly, pleural effusion"
    with pytest.raises(ValueError, match="shape"):
        clue_text(torch.zeros(2, 14))


def test_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        DiseaseClueConfig(threshold=1.0)
    with pytest.raises(ValueError, match="uncertain_policy"):
        DiseaseClueConfig(uncertain_policy="drop")
    with pytest.raises(ValueError, match="hidden_dim"):
        DiseaseClueConfig(hidden_dim=-1)
