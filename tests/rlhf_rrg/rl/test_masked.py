import math

import pytest
import torch

from rlhf_rrg.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten

# Real tokens: row 0 -> 1, 2, 3; row 1 -> 4. Padding holds values that would poison a multiply-by-mask.
X = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, float("inf"), -float("inf"), 1e30]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_masked_sum_and_mean_by_hand():
    # sum = 1 + 2 + 3 + 4 = 10 over 4 real tokens -> mean 2.5
    assert masked_sum(X, MASK).item() == 10.0
    assert masked_mean(X, MASK).item() == 2.5
    # per row: sums [6, 4], means [6/3, 4/1] = [2, 4]
    torch.testing.assert_close(masked_sum(X, MASK, dim=1), torch.tensor([6.0, 4.0]))
    torch.testing.assert_close(masked_mean(X, MASK, dim=1), torch.tensor([2.0, 4.0]))


def test_masked_var_by_hand():
    # deviations from 2.5: -1.5, -0.5, 0.5, 1.5 -> squares sum to 2.25 + 0.25 + 0.25 + 2.25 = 5
    torch.testing.assert_close(masked_var(X, MASK, unbiased=False), torch.tensor(5.0 / 4))
    torch.testing.assert_close(masked_var(X, MASK, unbiased=True), torch.tensor(5.0 / 3))


def test_masked_whiten_by_hand():
    out = masked_whiten(X, MASK)
    std = math.sqrt(5.0 / 3 + 1e-8)
    expected = torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std, 0.0], [1.5 / std, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)
    kept = masked_whiten(X, MASK, shift_mean=False)
    torch.testing.assert_close(kept, torch.where(MASK.bool(), expected + 2.5, torch.zeros(())))


def test_extra_padding_changes_nothing():
    padded_x = torch.cat([X, torch.full((2, 3), 7.0)], dim=1)
    padded_mask = torch.cat([MASK, torch.zeros(2, 3, dtype=MASK.dtype)], dim=1)
    assert masked_mean(padded_x, padded_mask) == masked_mean(X, MASK)
    assert masked_var(padded_x, padded_mask) == masked_var(X, MASK)
    torch.testing.assert_close(masked_whiten(padded_x, padded_mask)[:, :4], masked_whiten(X, MASK))


def test_gradient_ignores_padding_even_when_infinite():
    x = X.clone().requires_grad_(True)
    masked_mean(x, MASK).backward()
    # d mean / d x = 1/4 on real tokens and exactly 0 (not nan) on padding
    torch.testing.assert_close(x.grad, MASK.float() / 4)


def test_bool_and_float_masks_agree():
    assert masked_mean(X, MASK.bool()) == masked_mean(X, MASK.float())


def test_errors():
    with pytest.raises(ValueError, match="mask has shape"):
        masked_mean(X, MASK[:, :3])
    with pytest.raises(ValueError, match="selects 1 element"):
        masked_var(X, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="selects 0 element"):
        masked_var(X, torch.zeros_like(MASK), unbiased=False)
    # one element is fine without Bessel's correction
    assert masked_var(X, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), unbiased=False).item() == 0.0
