"""Token-level unlikelihood: candidates, value against a direct loop, and what it penalises."""

import math

import pytest
import torch

from rlhf_rrg.losses.unlikelihood import unlikelihood_loss


def loop_unlikelihood(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Welleck et al.'s definition written out: per target position, the earlier distinct report targets minus the
    current target; summed, divided by the number of target positions."""
    total, positions = 0.0, 0
    probs = logits.double().softmax(-1)
    for i in range(labels.shape[0]):
        seen: list[int] = []
        for t in range(1, labels.shape[1]):
            target = int(labels[i, t])
            if target == -100:
                continue
            positions += 1
            for c in set(seen) - {target}:
                total -= math.log(1 - float(probs[i, t - 1, c]))
            seen.append(target)
    return total / positions


def test_matches_the_definition_on_random_logits_with_prompt_and_padding():
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 6)
    labels = torch.tensor([[-100, -100, 1, 2, 1, 1, 3, 2, -100],   # repeats inside the report
                           [-100, 4, 4, 4, 5, -100, -100, -100, -100],
                           [-100, -100, -100, -100, 0, 0, 1, -100, -100]])  # token id 0, as padding's clamp is
    assert unlikelihood_loss(logits, labels).item() == pytest.approx(loop_unlikelihood(logits, labels), rel=1e-5)


def test_prompt_tokens_are_never_candidates():
    torch.manual_seed(1)
    logits = torch.randn(1, 5, 6)
    # Token 3 sits in the (ignored) prompt only: putting all the mass on it at the report's positions costs nothing.
    logits[0, :, 3] = 30.0
    labels = torch.tensor([[-100, -100, 1, 2, 4]])
    assert unlikelihood_loss(logits, labels).item() < 1e-6


def test_zero_for_a_model_on_its_references_and_large_for_one_restating():
    labels = torch.tensor([[-100, 1, 2, 3, 1, 4]])  # token 1 recurs as a target: never a candidate there
    follows = torch.full((1, 6, 6), -30.0)
    for t in range(5):
        follows[0, t, labels[0, t + 1]] = 30.0
    assert unlikelihood_loss(follows, labels).item() < 1e-6
    restates = follows.clone()
    restates[0, 4, 4], restates[0, 4, 2] = -30.0, 30.0  # at the last position it puts its mass on token 2 again
    assert unlikelihood_loss(restates, labels).item() > 10 / 5
