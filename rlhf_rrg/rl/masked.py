"""Reductions over the real tokens of right-padded response batches.

Padded positions are selected away with ``torch.where`` rather than multiplied by zero, so garbage in the
padding (``-inf`` log-probs, ``nan`` values) can never leak into a result: ``0 * inf`` is ``nan``.
Conventions follow TRL ``trl/trainer/utils.py`` and torchtune ``torchtune/rlhf/utils/_generation.py``.
"""

from __future__ import annotations

import torch

# Added to the variance before the reciprocal square root, as in TRL and torchtune.
_WHITEN_EPS = 1e-8


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.shape != x.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the values have shape {tuple(x.shape)}")
    return mask.bool()


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sums ``x`` over the positions where ``mask`` is set.

    Args:
        x: Values, any shape, e.g. ``(b, t)``.
        mask: Same shape as ``x``; nonzero (or ``True``) on real tokens.
        dim: Dimension to reduce; ``None`` reduces everything to a scalar.

    Returns:
        The masked sum: a scalar, or ``x`` with ``dim`` removed.
    """
    keep = _check_mask(x, mask)
    masked = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Averages ``x`` over the positions where ``mask`` is set.

    An all-padding row (or an all-padding tensor when ``dim`` is ``None``) gives ``nan``: checking for it
    would force a host sync on every call, and such a row means the caller built the mask wrong.

    Args:
        x: Values, any shape, e.g. ``(b, t)``.
        mask: Same shape as ``x``; nonzero (or ``True``) on real tokens.
        dim: Dimension to reduce; ``None`` reduces everything to a scalar.

    Returns:
        The masked mean: a scalar, or ``x`` with ``dim`` removed.
    """
    keep = _check_mask(x, mask)
    count = keep.sum() if dim is None else keep.sum(dim)
    return masked_sum(x, keep, dim) / count.to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all positions where ``mask`` is set.

    Args:
        x: Values, any shape, e.g. ``(b, t)``.
        mask: Same shape as ``x``; nonzero (or ``True``) on real tokens.
        unbiased: Apply Bessel's correction ``n / (n - 1)``, as TRL's ``masked_var`` does by default.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If the mask selects no element, or only one when ``unbiased`` is set.
    """
    keep = _check_mask(x, mask)
    count = int(keep.sum())
    if count == 0 or (unbiased and count == 1):
        raise ValueError(
            f"mask selects {count} element(s); the {'unbiased ' if unbiased else ''}variance is undefined"
        )
    centered = x - masked_mean(x, keep)
    variance = masked_mean(centered * centered, keep)
    if unbiased:
        variance = variance * (count / (count - 1))
    return variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalises ``x`` to zero mean and unit variance over the real tokens.

    With ``shift_mean=False`` the mean is added back (only the scale changes), which is how TRL's PPO
    whitens rewards so their sign is kept.

    Args:
        x: Values, any shape, e.g. ``(b, t)``.
        mask: Same shape as ``x``; nonzero (or ``True``) on real tokens.
        shift_mean: Subtract the mean (``True``) or keep it (``False``).

    Returns:
        Same shape as ``x``; padded positions are zero.
    """
    keep = _check_mask(x, mask)
    mean = masked_mean(x, keep)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, keep, unbiased=True) + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))
