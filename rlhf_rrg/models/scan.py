"""Selective scan (the Mamba S6 recurrence) with mamba-ssm's signature.

On CUDA tensors the fused kernel of the optional ``mamba-ssm`` extra is used when it imports; everywhere else a
pure-torch sequential scan with a hand-written backward runs. The fallback is linear in the sequence length: the
forward loop keeps the hidden states, the backward loop runs the adjoint recurrence in reverse, and every other term
is a batched contraction, all in chunks of time steps so that the temporaries stay cache-sized.
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


def _time_major_groups(x: torch.Tensor) -> torch.Tensor:
    """B or C, (b, n, l) or (b, g, n, l) -> time-major (l, b, g, n); the shared layout is the g = 1 case."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x.permute(3, 0, 1, 2).contiguous()


def _from_time_major_groups(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_time_major_groups` for a gradient (l, b, g, n), cast to ``like``'s dtype."""
    grad = grad.permute(1, 2, 3, 0)
    return (grad.squeeze(1) if like.dim() == 3 else grad).to(like.dtype)


def _discretise(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (delta after bias and softplus, its derivative w.r.t. the raw delta), both (b, d, l)."""
    pre = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        return F.softplus(pre), torch.sigmoid(pre)
    return pre, torch.ones_like(pre)


# Time steps per chunk: the (chunk, b, d, n) temporaries stay cache-sized instead of materialising (l, b, d, n) ones.
_CHUNK = 64


def _chunk_states(
    dA: torch.Tensor, dtu: torch.Tensor, B: torch.Tensor, h_before: torch.Tensor | None
) -> torch.Tensor:
    """Hidden states of one chunk: ``h_t = dA_t * h_{t-1} + dtu_t * B_t``.

    Args:
        dA: exp(dt A), (T, b, d, n).
        dtu: dt * u, (T, b, d).
        B: (T, b, g, n), channel group ``c // (d // g)`` reads group ``g``.
        h_before: State before the chunk, (b, d, n); None at the sequence start (zero state).

    Returns:
        (T, b, d, n) states.
    """
    steps, b, d, n = dA.shape
    g = B.shape[2]
    h = (dtu.view(steps, b, g, d // g, 1) * B[:, :, :, None, :]).view(steps, b, d, n)
    if h_before is not None:
        h[0].addcmul_(dA[0], h_before)
    for t in range(1, steps):
        h[t].addcmul_(dA[t], h[t - 1])
    return h


class _SelectiveScan(torch.autograd.Function):
    """Runs time-major with channels split into groups, (l, b, g, h, n) with d = g * h: each recurrence step
    touches one contiguous slab and every contraction over n or h is a batched matmul. Only the state at the end of
    each chunk is kept for backward (memory l / _CHUNK times smaller than all states); backward recomputes a
    chunk's states from the previous chunk's last state."""

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
        # fp32 accumulation as in mamba-ssm (fp64 stays fp64 so gradcheck is meaningful)
        ct = torch.promote_types(u.dtype, torch.float32)
        b, d, length = u.shape
        n = A.shape[1]
        A_ = A.to(ct)
        Bt, Ct = _time_major_groups(B.to(ct)), _time_major_groups(C.to(ct))  # (l, b, g, n)
        g = Bt.shape[2]
        u_ = u.to(ct)
        dt, _ = _discretise(delta.to(ct), None if delta_bias is None else delta_bias.to(ct), delta_softplus)
        dt_t = dt.permute(2, 0, 1).contiguous()  # (l, b, d)
        dtu_t = (dt_t * u_.permute(2, 0, 1)).contiguous()
        starts = range(0, length, _CHUNK)
        h_ends = torch.empty(len(starts), b, d, n, dtype=ct, device=u.device)
        y_t = torch.empty(length, b, d, dtype=ct, device=u.device)
        for k, s in enumerate(starts):
            e = min(s + _CHUNK, length)
            dA = torch.exp(dt_t[s:e, ..., None] * A_)
            h = _chunk_states(dA, dtu_t[s:e], Bt[s:e], h_ends[k - 1] if k else None)
            h_ends[k] = h[-1]
            y_t[s:e] = (h.view(e - s, b, g, d // g, n) @ Ct[s:e, ..., None]).view(e - s, b, d)
        y = y_t.permute(1, 2, 0)
        if D is not None:
            y = y + D.to(ct)[:, None] * u_
        y_pre = y
        if z is not None:
            y = y * F.silu(z.to(ct))
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h_ends, y_pre)
        return y.to(u.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, h_ends, y_pre = ctx.saved_tensors
        ct = h_ends.dtype
        b, d, length = u.shape
        n = A.shape[1]
        u_, A_ = u.to(ct), A.to(ct)
        dt, ddt_draw = _discretise(delta.to(ct), None if delta_bias is None else delta_bias.to(ct), ctx.delta_softplus)
        Bt, Ct = _time_major_groups(B.to(ct)), _time_major_groups(C.to(ct))
        g = Bt.shape[2]
        gy = grad_out.to(ct)

        dz = None
        if z is not None:
            z_ = z.to(ct)
            sig = torch.sigmoid(z_)
            dz = (gy * y_pre * sig * (1 + z_ * (1 - sig))).to(z.dtype)
            gy = gy * z_ * sig
        dD = None if D is None else (gy * u_).sum((0, 2)).to(D.dtype)

        gy_t, dt_t = gy.permute(2, 0, 1).contiguous(), dt.permute(2, 0, 1).contiguous()  # (l, b, d)
        u_t = u_.permute(2, 0, 1)
        dtu_t = (dt_t * u_t).contiguous()
        dB, dC = torch.empty_like(Bt), torch.empty_like(Ct)
        lam_B = torch.empty_like(dt_t)  # sum_n lam_t B_t
        ddt_A = torch.empty_like(dt_t)  # sum_n A * dL/d(dA_t) * dA_t
        dA_param = torch.zeros_like(A_)
        carry: torch.Tensor | None = None  # exp(dt_e A) lam_e from the chunk after this one
        for k, s in reversed(list(enumerate(range(0, length, _CHUNK)))):
            e = min(s + _CHUNK, length)
            grp = (e - s, b, g, d // g)
            h_before = h_ends[k - 1] if k else None
            dA = torch.exp(dt_t[s:e, ..., None] * A_)
            h = _chunk_states(dA, dtu_t[s:e], Bt[s:e], h_before)
            # adjoint recurrence: lam_t = dL/dh_t = g_t C_t + exp(dt_{t+1} A) lam_{t+1}
            lam = (gy_t[s:e].view(*grp, 1) * Ct[s:e, :, :, None, :]).view(e - s, b, d, n)
            if carry is not None:
                lam[-1].add_(carry)
            for t in range(e - s - 2, -1, -1):
                lam[t].addcmul_(dA[t + 1], lam[t + 1])
            carry = dA[0] * lam[0]
            lam_g = lam.view(*grp, n)
            dC[s:e] = (gy_t[s:e].view(*grp)[..., None, :] @ h.view(*grp, n)).squeeze(-2)
            dB[s:e] = (dtu_t[s:e].view(*grp)[..., None, :] @ lam_g).squeeze(-2)
            lam_B[s:e] = (lam_g @ Bt[s:e, ..., None]).view(e - s, b, d)
            # dL/d(dA_t) * dA_t = lam_t h_{t-1} exp(dt_t A), zero at t = 0; built in place of dA
            x = dA.mul_(lam)
            x[1:].mul_(h[:-1])
            if h_before is None:
                x[0].zero_()
            else:
                x[0].mul_(h_before)
            ddt_A[s:e] = (x * A_).sum(-1)
            dA_param += x.mul_(dt_t[s:e, ..., None]).sum((0, 1))

        du = lam_B * dt_t
        if D is not None:
            du = du + (gy * D.to(ct)[:, None]).permute(2, 0, 1)
        ddelta = (ddt_A + lam_B * u_t).permute(1, 2, 0) * ddt_draw
        ddelta_bias = None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype)
        return (
            du.permute(1, 2, 0).to(u.dtype),
            ddelta.to(delta.dtype),
            dA_param.to(A.dtype),
            _from_time_major_groups(dB, B),
            _from_time_major_groups(dC, C),
            dD,
            dz,
            ddelta_bias,
            None,
        )


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
        raise ValueError(
            f"selective_scan: u and delta must both be (b, d, l); got {tuple(u.shape)}, {tuple(delta.shape)}"
        )
    b, d, length = u.shape
    if A.is_complex() or A.dim() != 2 or A.shape[0] != d:
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
