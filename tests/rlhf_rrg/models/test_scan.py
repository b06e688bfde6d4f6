import pytest
import torch

import rlhf_rrg.models.scan as scan
from rlhf_rrg.models.scan import selective_scan


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Independent fp64 reference: a per-step loop written straight from the S6 equations (autograd does the rest)."""
    b, d, length = u.shape
    n = A.shape[1]
    dt = delta + delta_bias[:, None] if delta_bias is not None else delta
    if delta_softplus:
        dt = torch.log1p(torch.exp(dt))

    def per_channel(M, t):  # -> (b, d, n)
        if M.dim() == 3:
            return M[:, None, :, t].expand(b, d, n)
        return M[:, :, :, t].repeat_interleave(d // M.shape[1], dim=1)

    h = torch.zeros(b, d, n, dtype=u.dtype)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * per_channel(B, t) * u[:, :, t, None]
        y = (h * per_channel(C, t)).sum(-1)
        if D is not None:
            y = y + D * u[:, :, t]
        ys.append(y)
    y = torch.stack(ys, -1)
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y


def make_inputs(groups, with_z, with_d, with_bias, dtype=torch.float32, b=2, d=6, n=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape_bc = (b, n, length) if groups is None else (b, groups, n, length)
    inputs = {
        "u": torch.randn(b, d, length, generator=g),
        "delta": torch.randn(b, d, length, generator=g) * 0.5,
        "A": -torch.rand(d, n, generator=g) * 2 - 0.1,
        "B": torch.randn(*shape_bc, generator=g),
        "C": torch.randn(*shape_bc, generator=g),
        "D": torch.randn(d, generator=g) if with_d else None,
        "z": torch.randn(b, d, length, generator=g) if with_z else None,
        "delta_bias": torch.randn(d, generator=g) * 0.3 if with_bias else None,
    }
    return {k: None if v is None else v.to(dtype).requires_grad_() for k, v in inputs.items()}


@pytest.mark.parametrize("groups", [None, 1, 3])
@pytest.mark.parametrize("with_z,with_d,with_bias,softplus", [(True, True, True, True), (False, False, False, False),
                                                              (True, False, True, False), (False, True, False, True)])
@pytest.mark.parametrize("chunk", [4, 64])  # 4: length 9 crosses two chunk boundaries (carry paths)
def test_values_and_grads_match_fp64_loop(groups, with_z, with_d, with_bias, softplus, chunk, monkeypatch):
    monkeypatch.setattr(scan, "_CHUNK", chunk)
    ours = make_inputs(groups, with_z, with_d, with_bias)
    if not softplus:
        # without softplus dt may be negative; keep it positive so exp(dt A) stays a contraction as in real use
        with torch.no_grad():
            ours["delta"].abs_()
    ref = {k: None if v is None else v.detach().double().requires_grad_() for k, v in ours.items()}

    y = selective_scan(**ours, delta_softplus=softplus)
    y_ref = naive_scan(**ref, delta_softplus=softplus)
    assert y.dtype == torch.float32 and y.shape == ours["u"].shape
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)

    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y.double() * w).sum().backward()
    (y_ref * w).sum().backward()
    for name, t in ours.items():
        if t is None:
            continue
        assert t.grad is not None, name
        assert t.grad.shape == t.shape, name
        torch.testing.assert_close(t.grad.double(), ref[name].grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("groups", [None, 2])
def test_gradcheck_fp64(groups, monkeypatch):
    monkeypatch.setattr(scan, "_CHUNK", 2)
    inputs = make_inputs(groups, True, True, True, dtype=torch.float64, b=1, d=4, n=3, length=5)
    names = list(inputs)

    def fn(*args):
        return selective_scan(**dict(zip(names, args, strict=True)), delta_softplus=True)

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in names), eps=1e-6, atol=1e-6)


def test_long_sequence_stays_finite():
    # a cumulative-sum-of-logs formulation overflows here; the recurrence must not
    inputs = make_inputs(None, True, True, True, length=600, d=3, n=2)
    with torch.no_grad():
        inputs["delta"].fill_(3.0)
    y = selective_scan(**inputs, delta_softplus=True)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(t.grad).all() for t in inputs.values() if t is not None)


def test_bad_shapes_name_the_argument():
    inputs = make_inputs(None, False, True, False)
    inputs["D"] = torch.ones(5)
    with pytest.raises(ValueError, match="D must be"):
        selective_scan(**inputs)
    inputs = make_inputs(4, False, False, False)  # d=6 not divisible by 4 groups
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**inputs)


def test_cpu_tensors_never_touch_mamba_ssm(monkeypatch):
    def boom():
        raise AssertionError("mamba_ssm dispatch attempted for CPU tensors")

    monkeypatch.setattr(scan, "_mamba_ssm_scan", boom)
    inputs = make_inputs(None, False, False, False)
    scan.selective_scan(**inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("groups", [None, 2])
def test_cuda_path_matches_cpu(groups):
    # on CUDA this runs mamba-ssm's kernel when it imports (kernel parity), else our scan on the GPU
    cpu = make_inputs(groups, True, True, True, length=300)
    cuda = {k: None if v is None else v.detach().cuda().requires_grad_() for k, v in cpu.items()}
    y = selective_scan(**cpu, delta_softplus=True)
    y_cuda = selective_scan(**cuda, delta_softplus=True)
    torch.testing.assert_close(y_cuda.cpu(), y, rtol=1e-4, atol=1e-4)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y * w).sum().backward()
    (y_cuda * w.cuda()).sum().backward()
    for name, t in cpu.items():
        if t is not None:
            torch.testing.assert_close(cuda[name].grad.cpu(), t.grad, rtol=1e-3, atol=1e-3, msg=name)


def test_backward_uses_the_forward_chunk_size(monkeypatch):
    # the chunk size lives on the autograd context: changing the module default in between must not matter
    monkeypatch.setattr(scan, "_CHUNK", 4)
    inputs = make_inputs(2, True, True, True)
    y = selective_scan(**inputs, delta_softplus=True)
    monkeypatch.setattr(scan, "_CHUNK", 3)
    y.sum().backward()
    ref = {k: None if v is None else v.detach().double().requires_grad_() for k, v in inputs.items()}
    naive_scan(**ref, delta_softplus=True).sum().backward()
    for name, t in inputs.items():
        torch.testing.assert_close(t.grad.double(), ref[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def _prepare(x, w, A, B, C, D, z, bias):
    """A toy 'branch': the scan input and step sizes are built from x by differentiable ops, as in a Mamba layer."""
    return torch.tanh(x) * w[:, None], x * 0.5, A, B, C, D, z, bias


@pytest.mark.parametrize("groups", [None, 2])
def test_recomputed_scan_gradcheck_fp64(groups, monkeypatch):
    monkeypatch.setattr(scan, "_CHUNK", 2)
    inputs = make_inputs(groups, True, True, True, dtype=torch.float64, b=1, d=4, n=3, length=5)
    w = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    order = ("u", "A", "B", "C", "D", "z", "delta_bias")
    args = (inputs["u"], w, *(inputs[k] for k in order[1:]))

    def fn(*a):
        return scan.recomputed_selective_scan(_prepare, *a, delta_softplus=True)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


def test_recomputed_scan_matches_plain_scan_and_saves_only_its_inputs(monkeypatch):
    monkeypatch.setattr(scan, "_CHUNK", 4)
    inputs = make_inputs(None, True, True, True, length=12)
    w = torch.randn(6, generator=torch.Generator().manual_seed(3)).requires_grad_()
    args = (inputs["u"], w, inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"], inputs["delta_bias"])
    plain_args = [a.detach().clone().requires_grad_() for a in args]

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = scan.recomputed_selective_scan(_prepare, *args, delta_softplus=True)
    # the inputs themselves plus the (chunks, b, d, n) end states; nothing derived from x is kept
    assert {t.data_ptr() for t in saved} == {a.data_ptr() for a in args} | {saved[-1].data_ptr()}
    assert saved[-1].shape == (3, 2, 6, 4)

    y_plain = selective_scan(*_prepare(*plain_args), delta_softplus=True)
    torch.testing.assert_close(y, y_plain)
    w_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * w_out).sum().backward()
    (y_plain * w_out).sum().backward()
    for a, p in zip(args, plain_args, strict=True):
        torch.testing.assert_close(a.grad, p.grad, rtol=1e-5, atol=1e-6)
