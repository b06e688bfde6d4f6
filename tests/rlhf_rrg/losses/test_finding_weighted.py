"""Finding-weighted LM loss: which sentences count as findings, token weights, and the weighted cross-entropy."""

import torch
import torch.nn.functional as F

from rlhf_rrg.losses.finding_weighted import finding_spans, token_weights, weighted_lm_loss


def test_finding_spans_are_the_sentences_stating_a_finding():
    report = "the heart is enlarged . the lungs are clear . no pneumothorax . sternotomy wires are intact ."
    spans = [report[s:e] for s, e in finding_spans(report)]
    assert spans == ["the heart is enlarged .", " sternotomy wires are intact ."]
    # Negated and normal statements are not findings; a hedged one is.
    assert finding_spans("no pleural effusion . heart size normal .") == []
    assert len(finding_spans("there may be a small left effusion .")) == 1


def test_token_weights_mark_tokens_overlapping_a_span():
    offsets = [(0, 3), (4, 9), (10, 12), (13, 21), (22, 23), (24, 27)]
    assert token_weights(offsets, [(0, 23)], 4.0) == [4.0] * 5 + [1.0]
    assert token_weights(offsets, [], 4.0) == [1.0] * 6


def test_weighted_loss_is_the_weighted_mean_of_shifted_token_ce():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 5, -100, -100]])
    ones = torch.ones(2, 5)
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(weighted_lm_loss(logits, labels, ones), plain.float(), check_dtype=False)
    weights = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    ce = {(i, t): F.cross_entropy(logits[i, t - 1], labels[i, t]) for i, t in ((0, 2), (0, 3), (0, 4), (1, 1), (1, 2))}
    expected = (3 * ce[0, 2] + ce[0, 3] + ce[0, 4] + ce[1, 1] + ce[1, 2]) / 7
    torch.testing.assert_close(weighted_lm_loss(logits, labels, weights).double(), expected)
