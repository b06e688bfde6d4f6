import math

import pytest
import torch

from rlhf_rrg.losses.self_refine import SelfRefineConfig, self_refining_loss, serpent_refining_loss

# Batch of 2, width 2. Padding rows hold garbage that must not matter.
IMAGE = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [99.0, 99.0]], [[0.0, 4.0], [0.0, 0.0], [0.0, 2.0]]])
IMAGE_MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
REPORT = torch.tensor(
    [[[-5.0, 7.0], [2.0, 1.0], [2.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 3.0], [50.0, 50.0], [50.0, 50.0]]]
)
# Row 0: the first position is a prompt token, excluded. Row 1: the last two are padding.
REPORT_MASK = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
# Pooled by hand: image [2, 1] and [0, 2]; report [4/3, 2/3] and [1, 2].


def test_mse_by_hand():
    want = ((2 - 4 / 3) ** 2 + (1 - 2 / 3) ** 2 + (0 - 1) ** 2 + (2 - 2) ** 2) / 4
    assert self_refining_loss(IMAGE, IMAGE_MASK, REPORT, REPORT_MASK).item() == pytest.approx(want, rel=1e-6)


def test_cosine_by_hand():
    # Row 0: [2, 1] and [4/3, 2/3] are parallel -> 0. Row 1: [0, 2] . [1, 2] = 4, norms 2 and sqrt 5.
    want = (0.0 + (1 - 4 / (2 * math.sqrt(5)))) / 2
    got = self_refining_loss(IMAGE, IMAGE_MASK, REPORT, REPORT_MASK, similarity="cosine").item()
    assert got == pytest.approx(want, abs=1e-6)


def test_gradients_reach_both_sides_and_skip_masked_positions():
    image = IMAGE.clone().requires_grad_(True)
    report = REPORT.clone().requires_grad_(True)
    self_refining_loss(image, IMAGE_MASK, report, REPORT_MASK).backward()
    # d/d image token = 2 (I - T) / (b * d) / n_real_tokens; row 0 has 2 real tokens.
    torch.testing.assert_close(image.grad[0, 0], torch.tensor([2 * (2 - 4 / 3), 2 * (1 - 2 / 3)]) / 4 / 2)
    assert torch.equal(image.grad[0, 2], torch.zeros(2))
    assert torch.equal(report.grad[0, 0], torch.zeros(2))
    assert torch.equal(report.grad[1, 2:], torch.zeros(2, 2))
    assert report.grad[1, 0].abs().sum() > 0


def test_identical_summaries_give_zero():
    tokens = torch.randn(3, 5, 4)
    mask = torch.ones(3, 5)
    assert self_refining_loss(tokens, mask, tokens, mask).item() == 0.0
    assert self_refining_loss(tokens, mask, 2 * tokens, mask, similarity="cosine").item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="width"):
        self_refining_loss(IMAGE, IMAGE_MASK, torch.zeros(2, 4, 3), REPORT_MASK)
    with pytest.raises(ValueError, match="batch sizes"):
        self_refining_loss(IMAGE, IMAGE_MASK, REPORT[:1], REPORT_MASK[:1])
    with pytest.raises(ValueError, match="all zeros"):
        self_refining_loss(IMAGE, IMAGE_MASK, REPORT, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="similarity"):
        SelfRefineConfig(similarity="l1")
    with pytest.raises(ValueError, match="weight"):
        SelfRefineConfig(weight=-1.0)


# SERPENT-VLM's formulation: 2 studies, 4 positions (position 0 a prompt token, row 1's last one padding),
# 3-token vocabulary embedded in 2 dimensions.
EMBEDDINGS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
POSITIONS = torch.tensor([[False, True, True, True], [False, True, True, False]])


def _peaked(tokens: list[list[int]]) -> torch.Tensor:
    """Logits so peaked that the gumbel-softmax at tau 0.07 is one-hot on ``tokens`` whatever the noise."""
    return torch.nn.functional.one_hot(torch.tensor(tokens), 3).float() * 1e4


def test_serpent_term_by_hand():
    logits = _peaked([[2, 0, 0, 1], [2, 1, 0, 2]])
    attention = torch.full((2, 2, 4, 4), 0.25)  # every query spreads its attention evenly over 4 keys
    image = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # Row 0: weights 0.25 * 3 / 3 on positions 1-3 -> report 0.25 * ([1,0] + [1,0] + [0,1]) = [0.5, 0.25].
    # Row 1: weights 0.25 * 2 / 2 on positions 1-2 -> report 0.25 * ([0,1] + [1,0]) = [0.25, 0.25].
    cos0 = 0.5 / math.hypot(0.5, 0.25)
    cos1 = 1.0
    got = serpent_refining_loss(logits, attention, EMBEDDINGS, POSITIONS, image)
    assert got.item() == pytest.approx(math.exp(cos0 + cos1), rel=1e-5)


def test_serpent_term_ignores_positions_that_predict_no_report_token():
    logits, attention, image = torch.randn(2, 4, 3), torch.rand(2, 2, 4, 4), torch.randn(2, 2)
    changed_logits, changed_attention = logits.clone(), attention.clone()
    changed_logits[~POSITIONS] = 5.0
    changed_attention[:, :, 0] = 7.0  # a prompt position as query
    changed_attention[:, :, :, 0] = 7.0  # ... and as key
    results = []
    for lg, at in ((logits, attention), (changed_logits, changed_attention)):
        torch.manual_seed(0)  # the same gumbel noise
        results.append(serpent_refining_loss(lg, at, EMBEDDINGS, POSITIONS, image))
    torch.testing.assert_close(results[0], results[1])


def test_minimising_the_serpent_term_pushes_the_report_away_from_the_image():
    # The sign the README states: a descent step on exp(sum cos) lowers the cosine of report and image.
    logits = _peaked([[2, 0, 0, 1], [2, 1, 0, 2]])
    attention = torch.full((2, 2, 4, 4), 0.25)
    image = torch.tensor([[1.0, 0.2], [0.3, 1.0]], requires_grad=True)
    before = serpent_refining_loss(logits, attention, EMBEDDINGS, POSITIONS, image)
    before.backward()
    with torch.no_grad():
        stepped = image - 0.1 * image.grad
    after = serpent_refining_loss(logits, attention, EMBEDDINGS, POSITIONS, stepped)
    assert after.item() < before.item()


def test_serpent_settings_are_validated():
    with pytest.raises(ValueError, match="formulation"):
        SelfRefineConfig(formulation="contrastive")
    with pytest.raises(ValueError, match="tau"):
        SelfRefineConfig(tau=0.0)
    with pytest.raises(ValueError, match="report_weight"):
        SelfRefineConfig(report_weight=0.0)
    with pytest.raises(ValueError, match="at least one report position"):
        serpent_refining_loss(torch.randn(2, 4, 3), torch.rand(2, 2, 4, 4), EMBEDDINGS,
                              torch.zeros(2, 4, dtype=torch.bool), torch.randn(2, 2))
