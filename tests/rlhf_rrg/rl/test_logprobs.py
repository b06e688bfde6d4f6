import math

import pytest
import torch

from rlhf_rrg.rl.logprobs import entropy_from_logits, logprobs_from_logits, response_logits_slice

# softmax([0, ln 2, ln 3]) = [1, 2, 3] / 6
LOGITS = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]))


def test_logprobs_by_hand():
    out = logprobs_from_logits(LOGITS, torch.tensor([[2, 0]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(3 / 6), math.log(1 / 6)]]))


def test_logprobs_with_temperature_by_hand():
    # logits / 2 -> probabilities proportional to [1, sqrt 2, sqrt 3]
    z = 1 + math.sqrt(2) + math.sqrt(3)
    out = logprobs_from_logits(LOGITS, torch.tensor([[2, 1]]), temperature=2.0)
    torch.testing.assert_close(out, torch.tensor([[math.log(math.sqrt(3) / z), math.log(math.sqrt(2) / z)]]))


def test_entropy_by_hand():
    # H = -(1/6 ln 1/6 + 2/6 ln 2/6 + 3/6 ln 3/6) = 0.298627 + 0.366204 + 0.346574 = 1.011404
    expected = -sum(p * math.log(p) for p in (1 / 6, 2 / 6, 3 / 6))
    torch.testing.assert_close(entropy_from_logits(LOGITS), torch.full((1, 2), expected))
    # uniform over 3 tokens: ln 3, whatever the temperature
    torch.testing.assert_close(
        entropy_from_logits(torch.zeros(2, 1, 3), temperature=0.5), torch.full((2, 1), math.log(3))
    )


def test_matches_naive_log_softmax_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 5), generator=gen)
    mine = logits.clone().requires_grad_(True)
    naive = logits.clone().requires_grad_(True)
    ours = logprobs_from_logits(mine, tokens, temperature=0.7)
    ref = torch.log_softmax(naive / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours, ref.float())
    weights = torch.randn(3, 5, generator=gen)
    (ours * weights).sum().backward()
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(mine.grad, naive.grad, rtol=1e-5, atol=1e-6)
    ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits), ent.float())


def test_bf16_logits_are_upcast():
    logits = torch.randn(2, 4, 50, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 50, (2, 4))
    out = logprobs_from_logits(logits.bfloat16(), tokens)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.bfloat16().double(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref.float(), rtol=0, atol=1e-5)


def test_response_slice_feeds_the_right_positions():
    # A "causal LM" that is certain the next token is current + 1 (mod v): its logit at position j
    # predicts token j + 1. Prompt [5, 6, 7] (P=3), response [8, 9, 0, 1] (R=4), then sequence ends.
    v = 10
    seq = torch.tensor([[5, 6, 7, 8, 9, 0, 1]])
    logits = 50.0 * torch.nn.functional.one_hot((seq + 1) % v, v).float()
    response = seq[:, 3:]
    sliced = response_logits_slice(logits, prompt_length=3, response_length=4)
    assert sliced.shape == (1, 4, v)
    assert torch.all(logprobs_from_logits(sliced, response) > -1e-6)
    # the off-by-one mistake (taking positions P..P+R-1) assigns ~ -50 nats to every response token
    assert torch.all(logprobs_from_logits(logits[:, 3:7], response) < -40)


def test_response_slice_accepts_forward_without_last_token_and_rejects_bad_lengths():
    logits = torch.zeros(1, 6, 4)
    assert response_logits_slice(logits, 3, 4).shape == (1, 4, 4)  # needs only P + R - 1 = 6 positions
    with pytest.raises(ValueError, match="needs at least 7 positions"):
        response_logits_slice(logits, 3, 5)
    with pytest.raises(ValueError, match="prompt_length must be >= 1"):
        response_logits_slice(logits, 0, 2)


def test_shape_and_temperature_errors():
    with pytest.raises(ValueError, match="expected logits"):
        logprobs_from_logits(LOGITS, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(LOGITS, temperature=0.0)
    assert logprobs_from_logits(torch.zeros(0, 3, 5), torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3)
