"""Selective scan (the Mamba S6 recurrence) with mamba-ssm's signature.

On CUDA tensors the fused kernel of the optional ``mamba-ssm`` extra is used when it imports; everywhere else a
pure-torch sequential scan with a hand-written backward runs. The fallback is linear in the sequence length and
works in chunks of time steps: the forward keeps only each chunk's last state, the backward recomputes a chunk's
states from it and runs the adjoint recurrence in reverse, and every other term is a batched contraction, so the
temporaries stay cache-sized. :func:`recomputed_selective_scan` also rebuilds the scan's inputs in backward, so a
Mamba layer saves little more than its input.
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


ScanArgs = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
]


def _scan_forward(args: ScanArgs, delta_softplus: bool, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward recurrence in time-major groups, (l, b, g, h, n) with d = g * h: each step touches one contiguous slab
    and every contraction over n or h is a batched matmul. All elementwise work is done a chunk at a time, so the
    only full-length tensors are the inputs and the output.

    Args:
        args: (u, delta, A, B, C, D, z, delta_bias) as in :func:`selective_scan`.
        delta_softplus: Apply softplus to the biased delta.
        chunk: Time steps per chunk.

    Returns:
        (y (b, d, l) in the compute dtype, state at the end of every chunk (num_chunks, b, d, n)).
    """
    u, delta, A, B, C, D, z, delta_bias = args
    # fp32 accumulation as in mamba-ssm (fp64 stays fp64 so gradcheck is meaningful)
    ct = torch.promote_types(u.dtype, torch.float32)
    b, d, length = u.shape
    n = A.shape[1]
    A_ = A.to(ct)
    bias = None if delta_bias is None else delta_bias.to(ct)
    Bt, Ct = _time_major_groups(B.to(ct)), _time_major_groups(C.to(ct))  # (l, b, g, n)
    g = Bt.shape[2]
    starts = range(0, length, chunk)
    h_ends = torch.empty(len(starts), b, d, n, dtype=ct, device=u.device)
    y = torch.empty(b, d, length, dtype=ct, device=u.device)
    for k, s in enumerate(starts):
        e = min(s + chunk, length)
        u_c = u[..., s:e].to(ct)
        dt, _ = _discretise(delta[..., s:e].to(ct), bias, delta_softplus)
        dt_t = dt.permute(2, 0, 1).contiguous()  # (T, b, d)
        dtu_t = (dt_t * u_c.permute(2, 0, 1)).contiguous()
        h = _chunk_states(torch.exp(dt_t[..., None] * A_), dtu_t, Bt[s:e], h_ends[k - 1] if k else None)
        h_ends[k] = h[-1]
        y_c = (h.view(e - s, b, g, d // g, n) @ Ct[s:e, ..., None]).view(e - s, b, d).permute(1, 2, 0)
        if D is not None:
            y_c = y_c + D.to(ct)[:, None] * u_c
        if z is not None:
            y_c = y_c * F.silu(z[..., s:e].to(ct))
        y[..., s:e] = y_c
    return y, h_ends


def _scan_backward(
    grad_out: torch.Tensor, args: ScanArgs, delta_softplus: bool, h_ends: torch.Tensor, chunk: int
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of :func:`_scan_forward` w.r.t. (u, delta, A, B, C, D, z, delta_bias), each None when absent.

    Runs over the chunks in reverse: each chunk's states are recomputed from the previous chunk's last state, the
    ungated output ``C h + D u`` (needed for the gate's gradient) is rebuilt from them rather than saved, and every
    elementwise term is formed per chunk, so the full-length tensors are the inputs and the gradients.
    """
    u, delta, A, B, C, D, z, delta_bias = args
    ct = h_ends.dtype
    b, d, length = u.shape
    n = A.shape[1]
    A_ = A.to(ct)
    D_ = None if D is None else D.to(ct)[:, None]
    bias = None if delta_bias is None else delta_bias.to(ct)
    Bt, Ct = _time_major_groups(B.to(ct)), _time_major_groups(C.to(ct))
    g = Bt.shape[2]
    du = torch.empty(b, d, length, dtype=ct, device=u.device)
    ddelta = torch.empty_like(du)
    dz = torch.empty_like(du) if z is not None else None
    dB, dC = torch.empty_like(Bt), torch.empty_like(Ct)
    dA_param = torch.zeros_like(A_)
    dD = torch.zeros(d, dtype=ct, device=u.device) if D is not None else None
    carry: torch.Tensor | None = None  # exp(dt_e A) lam_e from the chunk after this one
    for k, s in reversed(list(enumerate(range(0, length, chunk)))):
        e = min(s + chunk, length)
        grp = (e - s, b, g, d // g)
        h_before = h_ends[k - 1] if k else None
        u_c, gy = u[..., s:e].to(ct), grad_out[..., s:e].to(ct)  # (b, d, T)
        dt, ddt_draw = _discretise(delta[..., s:e].to(ct), bias, delta_softplus)
        if z is not None:
            z_c = z[..., s:e].to(ct)
            sig = torch.sigmoid(z_c)
            gate_grad = gy  # dL/dy before the gate, for dz
            gy = gy * z_c * sig
        if dD is not None:
            dD += (gy * u_c).sum((0, 2))
        gy_t, dt_t = gy.permute(2, 0, 1).contiguous(), dt.permute(2, 0, 1).contiguous()  # (T, b, d)
        u_t = u_c.permute(2, 0, 1)
        dtu_t = (dt_t * u_t).contiguous()
        dA = torch.exp(dt_t[..., None] * A_)
        h = _chunk_states(dA, dtu_t, Bt[s:e], h_before)
        if z is not None:
            y_pre = (h.view(*grp, n) @ Ct[s:e, ..., None]).view(e - s, b, d).permute(1, 2, 0)
            if D_ is not None:
                y_pre = y_pre + D_ * u_c
            dz[..., s:e] = gate_grad * y_pre * sig * (1 + z_c * (1 - sig))
        # adjoint recurrence: lam_t = dL/dh_t = g_t C_t + exp(dt_{t+1} A) lam_{t+1}
        lam = (gy_t.view(*grp, 1) * Ct[s:e, :, :, None, :]).view(e - s, b, d, n)
        if carry is not None:
            lam[-1].add_(carry)
        for t in range(e - s - 2, -1, -1):
            lam[t].addcmul_(dA[t + 1], lam[t + 1])
        carry = dA[0] * lam[0]
        lam_g = lam.view(*grp, n)
        dC[s:e] = (gy_t.view(*grp)[..., None, :] @ h.view(*grp, n)).squeeze(-2)
        dB[s:e] = (dtu_t.view(*grp)[..., None, :] @ lam_g).squeeze(-2)
        lam_B = (lam_g @ Bt[s:e, ..., None]).view(e - s, b, d)  # sum_n lam_t B_t
        # dL/d(dA_t) * dA_t = lam_t h_{t-1} exp(dt_t A), zero at t = 0; built in place of dA
        x = dA.mul_(lam)
        x[1:].mul_(h[:-1])
        if h_before is None:
            x[0].zero_()
        else:
            x[0].mul_(h_before)
        ddt_A = (x * A_).sum(-1)  # sum_n A * dL/d(dA_t) * dA_t
        dA_param += x.mul_(dt_t[..., None]).sum((0, 1))
        du_c = (lam_B * dt_t).permute(1, 2, 0)
        du[..., s:e] = du_c if D_ is None else du_c + gy * D_
        ddelta[..., s:e] = (ddt_A + lam_B * u_t).permute(1, 2, 0) * ddt_draw

    ddelta_bias = None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype)
    return (
        du.to(u.dtype),
        ddelta.to(delta.dtype),
        dA_param.to(A.dtype),
        _from_time_major_groups(dB, B),
        _from_time_major_groups(dC, C),
        None if dD is None else dD.to(D.dtype),
        None if dz is None else dz.to(z.dtype),
        ddelta_bias,
    )


class _SelectiveScan(torch.autograd.Function):
    """Saves the inputs and the state at the end of each chunk (memory l / chunk times smaller than all states);
    backward recomputes a chunk's states from the previous chunk's last state."""

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
        args = (u, delta, A, B, C, D, z, delta_bias)
        # the chunk size is fixed per call: backward must split time exactly as this forward did
        ctx.delta_softplus, ctx.chunk = delta_softplus, _CHUNK
        y, h_ends = _scan_forward(args, delta_softplus, ctx.chunk)
        ctx.save_for_backward(*args, h_ends)
        return y.to(u.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        *args, h_ends = ctx.saved_tensors
        return *_scan_backward(grad_out, tuple(args), ctx.delta_softplus, h_ends, ctx.chunk), None


class _RecomputedScan(torch.autograd.Function):
    """Selective scan over inputs built by ``prepare(*tensors)``: saves only ``tensors`` and the chunk-end states.

    Backward re-runs ``prepare`` (cheap elementwise/projection work) under autograd, runs the scan's adjoint on its
    outputs and back-propagates through them to ``tensors``; the scan's own forward is never repeated.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        prepare: Callable[..., ScanArgs],
        delta_softplus: bool,
        *tensors: torch.Tensor,
    ) -> torch.Tensor:
        device_type = tensors[0].device.type
        ctx.prepare, ctx.delta_softplus, ctx.chunk = prepare, delta_softplus, _CHUNK
        ctx.autocast = (device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type))
        with torch.no_grad():
            args = prepare(*tensors)
            _check_args(*args[:7])
            y, h_ends = _scan_forward(args, delta_softplus, ctx.chunk)
        ctx.save_for_backward(*tensors, h_ends)
        return y.to(args[0].dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        *tensors, h_ends = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        device_type, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            args = ctx.prepare(*leaves)
        arg_grads = _scan_backward(
            grad_out, tuple(None if a is None else a.detach() for a in args), ctx.delta_softplus, h_ends, ctx.chunk
        )
        pairs = [(a, ga) for a, ga in zip(args, arg_grads, strict=True) if ga is not None and a.requires_grad]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(
            torch.autograd.grad([a for a, _ in pairs], wanted, [ga for _, ga in pairs], allow_unused=True)
            if pairs and wanted
            else ()
        )
        return None, None, *(next(grads) if leaf.requires_grad else None for leaf in leaves)


def _check_args(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None = None,
) -> None:
    """Raise a ValueError naming the first argument whose shape does not fit :func:`selective_scan`."""
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
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    if u.is_cuda and (fused := _mamba_ssm_scan()) is not None:
        return fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def recomputed_selective_scan(
    prepare: Callable[..., ScanArgs], *tensors: torch.Tensor, delta_softplus: bool = False
) -> torch.Tensor:
    """:func:`selective_scan` of ``prepare(*tensors)`` that keeps only ``tensors`` for backward.

    A Mamba branch's scan inputs (conv, silu, projections: about five (b, d, l) tensors) are cheap to rebuild, so
    instead of letting autograd save them, backward re-runs ``prepare`` and feeds the scan's adjoint through it. With
    the chunk-end states this is what makes the Vim encoder's training memory fall below a ViT's of equal size.

    Args:
        prepare: Maps ``tensors`` to (u, delta, A, B, C, D, z, delta_bias) for :func:`selective_scan`; must be
            deterministic (it runs again in backward).
        *tensors: Everything ``prepare`` reads that may need a gradient (activations and parameters).
        delta_softplus: As in :func:`selective_scan`.

    Returns:
        y: (b, d, l) in u's dtype.
    """
    if tensors[0].is_cuda and (fused := _mamba_ssm_scan()) is not None:
        return fused(*prepare(*tensors), delta_softplus)
    return _RecomputedScan.apply(prepare, delta_softplus, *tensors)
