"""Policy-gradient losses: clipped PPO (policy and value) and self-critical sequence training.

All token-level losses average over every real token of the batch (``masked_mean`` over ``(b, t)``), the
convention of TRL and torchtune ``rlhf/loss/ppo.py``. Returned stats are detached scalars for logging.
"""

from __future__ import annotations

import torch

from rlhf_rrg.rl.masked import masked_mean, masked_sum


def _check_shapes(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    bad = {name: tuple(t.shape) for name, t in tensors.items() if t.shape != mask.shape}
    if bad:
        raise ValueError(f"expected shape {tuple(mask.shape)} like mask, got {bad}")


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective of PPO (Schulman et al. 2017, Eq. 7), negated for minimisation.

    ``L = mean_tokens max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))`` with ``rho = exp(logp - logp_old)``.
    Outside the trust region on the side the advantage pushes towards, the clipped term wins and the
    gradient is exactly zero.

    Args:
        logprobs: ``(b, t)`` current policy log-probs of the sampled tokens (with grad).
        old_logprobs: ``(b, t)`` log-probs at rollout time.
        advantages: ``(b, t)`` per-token advantages, or ``(b,)`` sequence advantages broadcast over tokens
            (GRPO/RLOO/SCST-style).
        mask: ``(b, t)`` 1 on real response tokens.
        clip_range: ``eps`` (> 0), e.g. 0.2.

    Returns:
        ``(loss, stats)``: scalar loss; stats ``clipfrac`` (fraction of tokens where clipping is active),
        ``approx_kl`` (``mean 0.5 * (logp - logp_old)^2``, the k2 estimator TRL and torchtune log) and
        ``ratio_mean``.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if advantages.dim() == 1:
        if advantages.shape[0] != logprobs.shape[0]:
            raise ValueError(
                f"sequence advantages must be (b,) = ({logprobs.shape[0]},), got {tuple(advantages.shape)}"
            )
        advantages = advantages.unsqueeze(1).expand_as(logprobs)
    _check_shapes(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss of PPO as in OpenAI baselines ``ppo2`` and torchtune ``PPOLoss``.

    ``V_clip = V_old + clip(V - V_old, -eps_v, eps_v)``; ``L = 0.5 * mean_tokens max((V - R)^2, (V_clip - R)^2)``.

    Args:
        values: ``(b, t)`` current value predictions (with grad).
        old_values: ``(b, t)`` value predictions at rollout time.
        returns: ``(b, t)`` GAE returns (:func:`rlhf_rrg.rl.advantages.gae_advantages`).
        mask: ``(b, t)`` 1 on real response tokens.
        clip_range_value: ``eps_v`` (> 0), e.g. 0.2.

    Returns:
        ``(loss, stats)``: scalar loss; stats ``vf_clipfrac`` (fraction of tokens where the clipped error is
        the larger one).
    """
    if clip_range_value <= 0:
        raise ValueError(f"clip_range_value must be > 0, got {clip_range_value}")
    _check_shapes(mask, values=values, old_values=old_values, returns=returns)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    error = (values - returns).square()
    error_clipped = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(error, error_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((error_clipped > error).to(values.dtype), mask)}
    return loss, stats


def _sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor, length_normalize: bool) -> torch.Tensor:
    """``(b,)`` sum of real-token log-probs per sequence, divided by the length when ``length_normalize``."""
    lengths = mask.bool().sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError("mask has a sequence with no real token")
    totals = masked_sum(logprobs, mask, dim=-1)
    return totals / lengths.to(totals.dtype) if length_normalize else totals


def scst_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, length_normalize: bool = True
) -> torch.Tensor:
    """Self-critical policy-gradient loss (Rennie et al. 2017; Miura et al. 2021 / ViLMedic ``scst_loss``).

    ``L = mean_b[ -A_b * sum_t logp_bt / len_b ]`` (no division when ``length_normalize`` is off), with
    ``A_b = r(sampled) - r(greedy)`` from :func:`rlhf_rrg.rl.advantages.scst_advantages`.

    Args:
        logprobs: ``(b, t)`` current policy log-probs of the sampled tokens (with grad).
        mask: ``(b, t)`` 1 on real response tokens; every row needs at least one.
        advantages: ``(b,)`` sequence advantages (constants).
        length_normalize: Divide each sequence's log-likelihood by its length.

    Returns:
        Scalar loss.
    """
    _check_shapes(mask, logprobs=logprobs)
    if advantages.shape != (logprobs.shape[0],):
        raise ValueError(f"advantages must be (b,) = ({logprobs.shape[0]},), got {tuple(advantages.shape)}")
    sequence = _sequence_logprobs(logprobs, mask, length_normalize)
    return -(advantages.detach().to(sequence.dtype) * sequence).mean()


def nll_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-averaged negative log-likelihood, the optional teacher-forcing term mixed into SCST.

    ViLMedic (Miura et al. 2021) adds the cross-entropy of the reference report to the SCST loss so the
    policy stays fluent; this is that cross-entropy given the reference tokens' log-probs.

    Args:
        logprobs: ``(b, t)`` policy log-probs of the reference tokens under teacher forcing (with grad).
        mask: ``(b, t)`` 1 on real reference tokens.

    Returns:
        Scalar ``-mean_tokens logp``.
    """
    _check_shapes(mask, logprobs=logprobs)
    return -masked_mean(logprobs, mask)
