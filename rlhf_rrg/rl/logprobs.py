"""Per-token log-probabilities and entropies from language-model logits.

A full ``log_softmax`` of ``(b, t, v)`` logits materialises another ``(b, t, v)`` tensor (plus an fp32 copy for
bf16 models); with a 150k vocabulary that is the largest allocation of an RL step. Like TRL's
``selective_log_softmax`` we gather the chosen logits and compute the normaliser one batch row at a time, so
the extra memory is ``(t, v)`` in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _per_row(logits: torch.Tensor, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Stacks ``fn(row_logits_fp32, row_index)`` over the batch to bound peak memory to one row."""
    if logits.shape[0] == 0:
        return logits.new_zeros(logits.shape[:2], dtype=torch.float32)
    return torch.stack([fn(logits[i].float(), i) for i in range(logits.shape[0])])


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each chosen token, ``log softmax(logits / temperature)[token]``.

    Pass the same ``temperature`` that was used for sampling, so the PPO ratio compares the sampling
    distribution (TRL and torchtune do the same).

    Args:
        logits: ``(b, t, v)`` logits whose position ``j`` predicts ``tokens[:, j]``
            (see :func:`response_logits_slice`).
        tokens: ``(b, t)`` token ids.
        temperature: Sampling temperature, > 0.

    Returns:
        ``(b, t)`` fp32 log-probabilities.
    """
    _check_temperature(temperature)
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (b, t, v) and tokens (b, t), got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )

    def row(row_logits: torch.Tensor, i: int) -> torch.Tensor:
        scaled = row_logits / temperature
        chosen = scaled.gather(-1, tokens[i].unsqueeze(-1)).squeeze(-1)
        return chosen - torch.logsumexp(scaled, dim=-1)

    return _per_row(logits, row)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of each next-token distribution, ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` with ``z = logits / T``.

    Args:
        logits: ``(b, t, v)`` logits.
        temperature: Sampling temperature, > 0.

    Returns:
        ``(b, t)`` fp32 entropies in nats.
    """
    _check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"expected logits (b, t, v), got {tuple(logits.shape)}")

    def row(row_logits: torch.Tensor, i: int) -> torch.Tensor:
        scaled = row_logits / temperature
        return torch.logsumexp(scaled, dim=-1) - (torch.softmax(scaled, dim=-1) * scaled).sum(-1)

    return _per_row(logits, row)


def response_logits_slice(logits: torch.Tensor, prompt_length: int, response_length: int) -> torch.Tensor:
    """Takes the logits that predict the response tokens from a forward over ``prompt + response``.

    Off-by-one: a causal LM's logit at position ``j`` predicts token ``j + 1``. With (left-padded) prompts
    of common length ``P`` followed by a response of length ``R``, the response tokens sit at positions
    ``P .. P+R-1`` and are predicted by logits ``P-1 .. P+R-2``. The logit at the final position predicts
    a token beyond the response and is dropped.

    Args:
        logits: ``(b, L, v)`` logits of the concatenated ``(b, L)`` sequence, ``L >= P + R - 1``.
        prompt_length: ``P``, the padded prompt length (>= 1) in the same token positions as ``logits``.
        response_length: ``R``, the padded response length.

    Returns:
        ``(b, R, v)`` view whose ``[:, j]`` predicts response token ``j``.
    """
    if prompt_length < 1:
        raise ValueError(
            f"prompt_length must be >= 1 (the first response token needs a preceding position), got {prompt_length}"
        )
    if response_length < 0 or prompt_length - 1 + response_length > logits.shape[1]:
        raise ValueError(
            f"response_length={response_length} with prompt_length={prompt_length} needs at least "
            f"{prompt_length - 1 + response_length} positions, logits have {logits.shape[1]}"
        )
    return logits[:, prompt_length - 1 : prompt_length - 1 + response_length]
