import numpy as np
import pytest
import torch

from rlhf_rrg.rl.advantages import (
    RunningMeanStd,
    gae_advantages,
    group_normalized_advantages,
    kl_penalized_rewards,
    rloo_advantages,
    scst_advantages,
)

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_kl_penalized_rewards_by_hand():
    scores = torch.tensor([1.0, 2.0])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -2.0, 9.0]])
    rewards, kl = kl_penalized_rewards(scores, logp, ref, MASK, kl_coef=0.1, estimator="k1")
    # k1 = logp - ref: row 0 [0.5, 0, -0.5]; row 1 [-1, 0, pad]
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -0.5], [-1.0, 0.0, 0.0]]))
    # -0.1 * kl, plus the score on the last real token (index 2 in row 0, index 1 in row 1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.05 + 1.0], [0.1, 2.0, 0.0]]))


def test_kl_penalized_rewards_padding_invariance():
    gen = torch.Generator().manual_seed(0)
    scores, logp, ref = (
        torch.randn(2, generator=gen),
        torch.randn(2, 3, generator=gen),
        torch.randn(2, 3, generator=gen),
    )
    rewards, kl = kl_penalized_rewards(scores, logp, ref, MASK, 0.3, "k3")
    pad = torch.randn(2, 4, generator=gen) * 100
    rewards_p, kl_p = kl_penalized_rewards(
        scores,
        torch.cat([logp, pad], 1),
        torch.cat([ref, -pad], 1),
        torch.cat([MASK, torch.zeros(2, 4, dtype=MASK.dtype)], 1),
        0.3,
        "k3",
    )
    torch.testing.assert_close(rewards_p[:, :3], rewards)
    torch.testing.assert_close(kl_p[:, :3], kl)
    assert not rewards_p[:, 3:].any() and not kl_p[:, 3:].any()


def test_mask_validation():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="not right-padded"):
        kl_penalized_rewards(torch.zeros(2), x, x, torch.tensor([[1, 0, 1], [1, 1, 1]]), 0.1)
    with pytest.raises(ValueError, match="no real token"):
        gae_advantages(x, x, torch.tensor([[0, 0, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="scores must be"):
        kl_penalized_rewards(torch.zeros(3), x, x, MASK, 0.1)
    with pytest.raises(ValueError, match="shape mismatch"):
        gae_advantages(x, torch.zeros(2, 2), MASK)


def test_gae_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    # t=2: delta = 2 + 0.9*0 - 1.5 = 0.5                  A2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35              A1 = 0.35 + 0.72*0.5 = 0.71
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4               A0 = 1.4 + 0.72*0.71 = 1.9112
    torch.testing.assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[1.9112 + 0.5, 0.71 + 1.0, 0.5 + 1.5]]))
    # gamma = lam = 1: returns are rewards-to-go whatever the values
    _, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[3.0, 2.0, 2.0]]))


def _gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE on one unpadded episode: A_t = sum_l (gamma*lam)^l delta_{t+l}."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** (s - t) * deltas[s] for s in range(t, n)) for t in range(n)]


def test_gae_matches_python_reference_with_right_padding():
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 1, 3, 4]
    rewards = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    values = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    mask = (torch.arange(5)[None] < torch.tensor(lengths)[:, None]).long()
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.95, lam=0.9)
    for i, n in enumerate(lengths):
        expected = _gae_reference(rewards[i, :n].tolist(), values[i, :n].tolist(), 0.95, 0.9)
        torch.testing.assert_close(adv[i, :n], torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(ret[i, :n], adv[i, :n] + values[i, :n])
        assert not adv[i, n:].any() and not ret[i, n:].any()


def test_gae_has_no_grad():
    values = torch.randn(1, 3, requires_grad=True)
    adv, ret = gae_advantages(torch.randn(1, 3), values, torch.ones(1, 3))
    assert not adv.requires_grad and not ret.requires_grad


def test_scst_advantages():
    torch.testing.assert_close(
        scst_advantages(torch.tensor([0.5, 0.2]), torch.tensor([0.3, 0.4])), torch.tensor([0.2, -0.2])
    )
    with pytest.raises(ValueError, match="shape mismatch"):
        scst_advantages(torch.zeros(2), torch.zeros(3))


def test_rloo_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    # prompt 0: 1 - (2+3)/2 = -1.5; 2 - (1+3)/2 = 0; 3 - (1+2)/2 = 1.5; prompt 1: constant -> 0
    torch.testing.assert_close(rloo_advantages(scores, k=3), torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    # identity: RLOO = k/(k-1) * (r - group mean)
    r = torch.randn(12, generator=torch.Generator().manual_seed(2))
    expected = 4 / 3 * (r.view(3, 4) - r.view(3, 4).mean(1, keepdim=True)).reshape(-1)
    torch.testing.assert_close(rloo_advantages(r, 4), expected)


def test_grpo_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 0: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> (r - 2) / (1 + 1e-4); constant group -> 0
    d = 1 / (1 + 1e-4)
    torch.testing.assert_close(group_normalized_advantages(scores, 3), torch.tensor([-d, 0.0, d, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(
        group_normalized_advantages(scores, 3, scale=False), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    )
    with pytest.raises(ValueError, match="k=4"):
        group_normalized_advantages(scores, 4)
    with pytest.raises(ValueError, match=">= 2"):
        rloo_advantages(scores, 1)


def test_running_mean_std_matches_numpy_over_the_stream():
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, generator=gen) * 3 + 1 for n in (1, 7, 4, 13)]
    rms = RunningMeanStd()
    for b in batches:
        rms.update(b)
    stream = torch.cat(batches).double().numpy()
    assert rms.count == stream.size
    assert rms.mean == pytest.approx(float(np.mean(stream)), rel=1e-12)
    assert rms.var == pytest.approx(float(np.var(stream)), rel=1e-12)


def test_running_mean_std_by_hand_and_normalize():
    rms = RunningMeanStd()
    rms.update(torch.tensor([1.0, 2.0, 3.0]))
    rms.update(torch.tensor([[4.0, 5.0]]))
    # stream 1..5: mean 3, population variance (4 + 1 + 0 + 1 + 4) / 5 = 2
    assert (rms.mean, rms.var, rms.count) == (pytest.approx(3.0), pytest.approx(2.0), 5)
    out = rms.normalize(torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 2.0 / (2.0 + 1e-8) ** 0.5]))
    torch.testing.assert_close(rms.normalize(torch.tensor([5.0]), shift_mean=False), torch.tensor([5.0 / 2.0**0.5]))


def test_running_mean_std_resume_is_exact(tmp_path):
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(6, generator=gen) for _ in range(4)]
    straight = RunningMeanStd()
    for b in batches:
        straight.update(b)
    first = RunningMeanStd()
    for b in batches[:2]:
        first.update(b)
    torch.save(first.state_dict(), tmp_path / "rms.pt")
    resumed = RunningMeanStd()
    resumed.load_state_dict(torch.load(tmp_path / "rms.pt", weights_only=True))
    for b in batches[2:]:
        resumed.update(b)
    assert resumed.state_dict() == straight.state_dict()
