import math

import pytest
import torch

from rlhf_rrg.rl.losses import nll_loss, ppo_policy_loss, ppo_value_loss, scst_loss


def _policy_case():
    # ratios 1.5, 0.5, 1.1, 0.5 against old log-probs of 0
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]])).requires_grad_(True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    return logp, old, adv


def test_ppo_policy_loss_by_hand():
    logp, old, adv = _policy_case()
    loss, stats = ppo_policy_loss(logp, old, adv, torch.ones(1, 4), clip_range=0.2)
    # tok0: A=1,  rho=1.5: max(-1.5, -1.2) = -1.2  (clipped)
    # tok1: A=-1, rho=0.5: max(0.5, 0.8)   = 0.8   (clipped)
    # tok2: A=2,  rho=1.1: max(-2.2, -2.2) = -2.2  (inside the region)
    # tok3: A=1,  rho=0.5: max(-0.5, -0.8) = -0.5  (below the region but moving towards it: unclipped)
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.8 - 2.2 - 0.5) / 4))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(0.5))
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor((1.5 + 0.5 + 1.1 + 0.5) / 4))
    kl = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2 + math.log(1.1) ** 2) / 4
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(kl))
    loss.backward()
    # dL/dlogp = -A * rho / 4 where unclipped, exactly 0 where the clipped term is active
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -2.0 * 1.1 / 4, -1.0 * 0.5 / 4]]))


def test_ppo_policy_gradient_sign():
    # at rho = 1 a positive advantage must raise the log-prob (negative gradient), a negative one lower it
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = ppo_policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2)
    loss.backward()
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]


def test_ppo_policy_padding_invariance_and_sequence_advantages():
    logp, old, adv = _policy_case()
    loss, stats = ppo_policy_loss(logp, old, adv, torch.ones(1, 4), 0.2)
    padded_logp = torch.cat([logp.detach(), torch.tensor([[50.0, -float("inf")]])], 1)
    padded_mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    padded_adv = torch.cat([adv, torch.tensor([[1e6, float("nan")]])], 1)
    loss_p, stats_p = ppo_policy_loss(padded_logp, torch.zeros(1, 6), padded_adv, padded_mask, 0.2)
    torch.testing.assert_close(loss_p, loss.detach())
    for key in stats:
        torch.testing.assert_close(stats_p[key], stats[key])
    # a (b,) advantage is the same as broadcasting it over the tokens
    seq_adv = torch.tensor([0.7])
    torch.testing.assert_close(
        ppo_policy_loss(logp, old, seq_adv, torch.ones(1, 4), 0.2)[0],
        ppo_policy_loss(logp, old, seq_adv.expand(1, 4), torch.ones(1, 4), 0.2)[0],
    )


def test_ppo_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 1.0]], requires_grad=True)
    old = torch.tensor([[0.0, 2.0, 0.0]])
    returns = torch.tensor([[0.5, 3.0, 2.0]])
    loss, stats = ppo_value_loss(values, old, returns, torch.ones(1, 3), clip_range_value=0.2)
    # tok0: V_clip = 0.2; max((1-0.5)^2, (0.2-0.5)^2) = max(0.25, 0.09) = 0.25
    # tok1: V_clip = 2.0; max(1, 1) = 1
    # tok2: V_clip = 0.2; max((1-2)^2, (0.2-2)^2) = max(1, 3.24) = 3.24  (clipped)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.25 + 1.0 + 3.24) / 3))
    torch.testing.assert_close(stats["vf_clipfrac"], torch.tensor(1 / 3))
    loss.backward()
    # 0.5 * 2 * (V - R) / 3 on unclipped tokens; 0 on tok2 where the saturated clip has no gradient
    torch.testing.assert_close(values.grad, torch.tensor([[0.5 / 3, -1.0 / 3, 0.0]]))


def test_scst_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -2.0, -100.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([0.5, -1.0])
    # normalised: row means -6/3 = -2 and -6/2 = -3 -> mean(-(0.5 * -2), -(-1 * -3)) = mean(1, -3) = -1
    loss = scst_loss(logp, mask, adv)
    torch.testing.assert_close(loss, torch.tensor(-1.0))
    loss.backward()
    # dL/dlogp = -A_b / len_b / b: row 0 -> -0.5/3/2 = -1/12, row 1 -> 1/2/2 = 0.25, padding 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 12, -1 / 12, -1 / 12], [0.25, 0.25, 0.0]]))
    # unnormalised: sums -6 and -6 -> mean(-(0.5 * -6), -(-1 * -6)) = mean(3, -6) = -1.5
    torch.testing.assert_close(scst_loss(logp, mask, adv, length_normalize=False), torch.tensor(-1.5))


def test_scst_loss_errors():
    with pytest.raises(ValueError, match="advantages must be"):
        scst_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="no real token"):
        scst_loss(torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), torch.zeros(2))


def test_nll_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -2.0, -float("inf")]])
    # -(-1 - 2 - 3 - 4 - 2) / 5 = 2.4; the -inf padding is ignored
    torch.testing.assert_close(nll_loss(logp, torch.tensor([[1, 1, 1], [1, 1, 0]])), torch.tensor(2.4))


def test_clip_range_validation():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        ppo_policy_loss(x, x, x, x, 0.0)
    with pytest.raises(ValueError, match="clip_range_value must be > 0"):
        ppo_value_loss(x, x, x, x, -1.0)
    with pytest.raises(ValueError, match="sequence advantages must be"):
        ppo_policy_loss(x, x, torch.zeros(3), x, 0.2)
    with pytest.raises(ValueError, match="like mask"):
        ppo_value_loss(x, x, torch.zeros(2, 2), x, 0.2)
