"""Rewards-to-advantages for PPO, SCST, RLOO and GRPO.

Advantages are constants of the policy-gradient objective, so every function here runs under
``torch.no_grad()``. Responses are right-padded: ``mask`` is 1 on a prefix of each row and 0 after it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf_rrg.rl.kl import KLEstimator, kl_per_token


def _check_right_padded(mask: torch.Tensor) -> torch.Tensor:
    """Returns ``mask`` as bool after checking every row is a non-empty prefix of ones."""
    keep = mask.bool()
    if keep.dim() != 2:
        raise ValueError(f"mask must be (b, t), got shape {tuple(mask.shape)}")
    if keep.shape[1] == 0 or not keep[:, 0].all():
        raise ValueError("mask has a response with no real token; every row needs at least one")
    if (keep[:, 1:] & ~keep[:, :-1]).any():
        raise ValueError("mask is not right-padded: a real token follows a padded one")
    return keep


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


@torch.no_grad()
def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards ``r_t = -beta * KL_t``, plus the sequence score at the last real token.

    Ziegler et al. 2019 / Ouyang et al. 2022 (InstructGPT), as in torchtune ``rlhf.get_rewards_ppo`` and
    TRL's former ``PPOTrainer.compute_rewards``.

    Args:
        scores: ``(b,)`` sequence-level rewards (e.g. ``-RadCliQ``).
        logprobs: ``(b, t)`` policy log-probs of the sampled response tokens (at rollout time).
        ref_logprobs: ``(b, t)`` reference-policy log-probs of the same tokens.
        mask: ``(b, t)`` 1 on real response tokens, right-padded.
        kl_coef: The KL coefficient ``beta`` (e.g. ``controller.value``).
        estimator: Per-token KL estimator, see :func:`rlhf_rrg.rl.kl.kl_per_token`.

    Returns:
        ``(rewards, kl)``, both ``(b, t)`` and zero on padding.
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    keep = _check_right_padded(mask)
    if scores.shape != (logprobs.shape[0],):
        raise ValueError(f"scores must be (b,) = ({logprobs.shape[0]},), got {tuple(scores.shape)}")
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(keep, kl_per_token(logprobs, ref_logprobs, estimator), zero)
    rewards = -kl_coef * kl
    last = keep.sum(-1) - 1
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, kl


@torch.no_grad()
def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, Eq. 16) over right-padded responses.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``, returns
    ``R_t = A_t + V_t``. The episode ends at the last real token (``V`` and ``A`` beyond it are 0), so
    padding never leaks into the real positions. Advantages are returned raw: whiten them with
    :func:`rlhf_rrg.rl.masked.masked_whiten` after computing returns, as torchtune ``estimate_advantages``
    and TRL do.

    Args:
        rewards: ``(b, t)`` per-token rewards (from :func:`kl_penalized_rewards`).
        values: ``(b, t)`` value-head estimates at rollout time.
        mask: ``(b, t)`` 1 on real response tokens, right-padded.
        gamma: Discount factor in ``[0, 1]``.
        lam: GAE lambda in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, both ``(b, t)`` and zero on padding.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    keep = _check_right_padded(mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(keep, values, zero)
    rewards = torch.where(keep, rewards.to(values.dtype), zero)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        running = deltas[:, t] + gamma * lam * running
        advantages[:, t] = running
    return advantages, torch.where(keep, advantages + values, zero)


@torch.no_grad()
def scst_advantages(sample_scores: torch.Tensor, greedy_scores: torch.Tensor) -> torch.Tensor:
    """Self-critical advantage ``r(sampled) - r(greedy)`` (Rennie et al. 2017, Eq. 9; Miura et al. 2021).

    Args:
        sample_scores: ``(b,)`` rewards of the sampled reports.
        greedy_scores: ``(b,)`` rewards of the greedy-decoded reports for the same inputs.

    Returns:
        ``(b,)`` advantages.
    """
    _check_same_shape(sample_scores=sample_scores, greedy_scores=greedy_scores)
    if sample_scores.dim() != 1:
        raise ValueError(f"sample_scores must be (b,), got shape {tuple(sample_scores.shape)}")
    return sample_scores - greedy_scores


def _grouped(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Views ``(b*k,)`` scores as ``(b, k)``: the ``k`` samples of each prompt are contiguous (TRL's layout)."""
    if k < 2:
        raise ValueError(f"k (samples per prompt) must be >= 2 for a group baseline, got {k}")
    if scores.dim() != 1 or scores.numel() % k != 0:
        raise ValueError(f"scores must be (b*k,) with k={k}, got shape {tuple(scores.shape)}")
    return scores.view(-1, k)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantage ``r_i - mean_{j != i} r_j`` (Ahmadian et al. 2024, Eq. 6).

    Args:
        scores: ``(b*k,)`` rewards, the ``k`` samples of each prompt contiguous.
        k: Samples per prompt (>= 2).

    Returns:
        ``(b*k,)`` advantages.
    """
    grouped = _grouped(scores, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


@torch.no_grad()
def group_normalized_advantages(scores: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO outcome advantage ``(r_i - mean(r)) / (std(r) + eps)`` within each group (Shao et al. 2024, Sec. 4.1.2).

    The std is the unbiased (Bessel-corrected) one and ``eps = 1e-4``, matching TRL's ``GRPOTrainer``.
    ``scale=False`` keeps only the mean-centering (Dr. GRPO, Liu et al. 2025).

    Args:
        scores: ``(b*k,)`` rewards, the ``k`` samples of each prompt contiguous.
        k: Group size (>= 2).
        scale: Divide by the group std.
        eps: Added to the std so constant groups give zero advantage instead of ``nan``.

    Returns:
        ``(b*k,)`` advantages.
    """
    grouped = _grouped(scores, k)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


class RunningMeanStd:
    """Running mean and variance of a stream of rewards, for reward normalisation.

    Merges batch moments with the parallel algorithm of Chan et al. 1979 (as OpenAI baselines'
    ``RunningMeanStd``), in float64 Python scalars so a resumed run reproduces the statistics bit for bit.
    Under data parallelism gather the scores from all ranks before :meth:`update` so every rank agrees.

    Args:
        eps: Added to the variance before the square root in :meth:`normalize`.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = eps
        self.mean = 0.0
        self.var = 1.0
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Adds a batch of values (any shape; all elements count) to the statistics."""
        batch = x.detach().double().reshape(-1)
        n = batch.numel()
        if n == 0:
            return
        batch_mean = float(batch.mean())
        batch_var = float(batch.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    def normalize(self, x: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """Returns ``(x - mean) / sqrt(var + eps)`` (``x / sqrt(var + eps)`` without ``shift_mean``), same shape."""
        centered = x - self.mean if shift_mean else x
        return centered / math.sqrt(self.var + self.eps)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])
