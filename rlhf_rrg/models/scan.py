"""Selective scan (the Mamba S6 recurrence) with mamba-ssm's signature.

On CUDA tensors the fused kernel of the optional ``mamba-ssm`` extra is used when it imports; everywhere else a
pure-torch sequential scan with a hand-written backward runs. The fallback is linear in the sequence length: the
forward loop keeps the hidden states, the backward loop runs the adjoint recurrence in reverse, and every other term
is a vectorised contraction over all time steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# The mamba-ssm import is attempted once: a failed import of a compiled extension is slow and noisy to retry.
_MAMBA_SSM_TRIED = False
_MAMBA_SSM_FN: Callable[..., torch.Tensor] | None = None


def _mamba_ssm_scan() -> Callable[..., torch.Tensor] | None:
    global _MAMBA_SSM_TRIED, _MAMBA_SSM_FN
    if not _MAMBA_SSM_TRIED:
        _MAMBA_SSM_TRIED = True
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception as err:  # ImportError, or a CUDA/triton load error from the compiled extension
            logger.info("mamba_ssm unavailable (%s); using the pure-torch selective scan", err)
        else:
            _MAMBA_SSM_FN = selective_scan_fn
    return _MAMBA_SSM_FN


def _expand_groups(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(b, n, l) -> (b, 1, n, l); (b, g, n, l) -> (b, d, n, l) with channel c reading group c // (d // g)."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    return x.repeat_interleave(dim // x.shape[1], dim=1)


def _reduce_groups(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`_expand_groups`: sum the per-channel gradient (b, d, n, l) back onto ``like``'s layout."""
    if like.dim() == 3:
        return grad.sum(1)
    b, d, n, length = grad.shape
    return grad.reshape(b, like.shape[1], d // like.shape[1], n, length).sum(2)


def _discretise(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (delta after bias and softplus, its derivative w.r.t. the raw delta), both (b, d, l)."""
    pre = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        return F.softplus(pre), torch.sigmoid(pre)
    return pre, torch.ones_like(pre)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        z: torch.Tensor | None,
        delta_bias: torch.Tensor | None,
        delta_softplus: bool,
    ) -> torch.Tensor:
        dtype_in = u.dtype
        # fp32 accumulation as in mamba-ssm (fp64 stays fp64 so gradcheck is meaningful)
        ct = torch.promote_types(u.dtype, torch.float32)
        u_, delta_, A_, B_, C_ = (t.to(ct) for t in (u, delta, A, B, C))
        bias_ = None if delta_bias is None else delta_bias.to(ct)
        dt, _ = _discretise(delta_, bias_, delta_softplus)
        Bx = _expand_groups(B_, u.shape[1])  # (b, d|1, n, l)
        Cx = _expand_groups(C_, u.shape[1])
        # time-major (l, b, d, n) so that each step reads/writes one contiguous slab
        dA = torch.exp(torch.einsum("bdl,dn->lbdn", dt, A_))
        hs = torch.einsum("bdl,bdnl->lbdn", dt * u_, Bx.expand(-1, u.shape[1], -1, -1))
        for t in range(1, hs.shape[0]):
            hs[t].addcmul_(dA[t], hs[t - 1])  # h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t
        y = torch.einsum("lbdn,bdnl->bdl", hs, Cx.expand(-1, u.shape[1], -1, -1))
        if D is not None:
            y = y + D.to(ct)[:, None] * u_
        y_pre = y
        if z is not None:
            y = y * F.silu(z.to(ct))
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, hs, y_pre)
        return y.to(dtype_in)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, hs, y_pre = ctx.saved_tensors
        ct = hs.dtype
        d = u.shape[1]
        u_, delta_, A_, B_, C_ = (t.to(ct) for t in (u, delta, A, B, C))
        bias_ = None if delta_bias is None else delta_bias.to(ct)
        dt, ddt_draw = _discretise(delta_, bias_, ctx.delta_softplus)
        Bx = _expand_groups(B_, d).expand(-1, d, -1, -1)  # (b, d, n, l)
        Cx = _expand_groups(C_, d).expand(-1, d, -1, -1)
        g = grad_out.to(ct)

        dz = None
        if z is not None:
            z_ = z.to(ct)
            sig = torch.sigmoid(z_)
            dz = (g * y_pre * sig * (1 + z_ * (1 - sig))).to(z.dtype)
            g = g * z_ * sig
        dD = None if D is None else (g * u_).sum((0, 2)).to(D.dtype)
        du = g * D.to(ct)[:, None] if D is not None else torch.zeros_like(u_)

        # adjoint recurrence: lam_t = dL/dh_t = C_t g_t + exp(dt_{t+1} A) lam_{t+1}
        dA = torch.exp(torch.einsum("bdl,dn->lbdn", dt, A_))
        lam = torch.einsum("bdl,bdnl->lbdn", g, Cx)
        for t in range(lam.shape[0] - 2, -1, -1):
            lam[t].addcmul_(dA[t + 1], lam[t + 1])

        dC = _reduce_groups(torch.einsum("bdl,lbdn->bdnl", g, hs), C_).to(C.dtype)
        h_prev = torch.cat([torch.zeros_like(hs[:1]), hs[:-1]])
        # dL/d(dA_t) * dA_t = lam_t h_{t-1} exp(dt_t A): shared by the dt and A gradients
        lam_dA_h = lam * dA * h_prev
        ddt = torch.einsum("lbdn,dn->bdl", lam_dA_h, A_)
        dA_param = torch.einsum("lbdn,bdl->dn", lam_dA_h, dt).to(A.dtype)
        lam_B = torch.einsum("lbdn,bdnl->bdl", lam, Bx)
        ddt = ddt + lam_B * u_
        du = (du + lam_B * dt).to(u.dtype)
        dB = _reduce_groups(torch.einsum("lbdn,bdl->bdnl", lam, dt * u_), B_).to(B.dtype)
        ddelta = ddt * ddt_draw
        ddelta_bias = None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype)
        return du, ddelta.to(delta.dtype), dA_param, dB, dC, dD, dz, ddelta_bias, None


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Selective scan ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``y_t = C_t h_t + D u_t``, times ``silu(z_t)``.

    Same signature and semantics as ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (real ``A`` only),
    where ``dt = softplus(delta + delta_bias)`` if ``delta_softplus`` else ``delta + delta_bias``.

    Args:
        u: Input, (b, d, l).
        delta: Step sizes before bias/softplus, (b, d, l).
        A: State matrix (negative for stability), (d, n).
        B: Input-dependent input matrix, (b, n, l) shared by all channels, or (b, g, n, l) with ``d % g == 0``.
        C: Input-dependent output matrix, same layout options as ``B``.
        D: Skip connection, (d,).
        z: Gate, (b, d, l).
        delta_bias: Bias added to ``delta``, (d,).
        delta_softplus: Apply softplus to the biased ``delta``.

    Returns:
        y: (b, d, l) in ``u``'s dtype (accumulated in at least fp32).
    """
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (b, d, l); got {tuple(u.shape)}, {tuple(delta.shape)}")
    b, d, length = u.shape
    if A.is_complex() or A.shape[0] != d or A.dim() != 2:
        raise ValueError(f"selective_scan: A must be real (d={d}, n); got {tuple(A.shape)} {A.dtype}")
    n = A.shape[1]
    for name, mat in (("B", B), ("C", C)):
        ok = (mat.dim() == 3 and mat.shape == (b, n, length)) or (
            mat.dim() == 4 and mat.shape[0] == b and mat.shape[2:] == (n, length) and d % mat.shape[1] == 0
        )
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be (b={b}, n={n}, l={length}) or (b, g, n, l) with d % g == 0; "
                f"got {tuple(mat.shape)}"
            )
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and vec.shape != (d,):
            raise ValueError(f"selective_scan: {name} must be (d={d},); got {tuple(vec.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must match u {tuple(u.shape)}; got {tuple(z.shape)}")

    if u.is_cuda and (fused := _mamba_ssm_scan()) is not None:
        return fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
