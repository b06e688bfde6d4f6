"""Forward+backward cost of the pure-torch selective scan versus sequence length, versus one ViT block, and of a
Mamba branch that rebuilds its scan inputs in backward versus one that lets autograd save them.

    python benchmarks/bench_scan.py           # 3 timed repeats per point
    python benchmarks/bench_scan.py --quick   # 1 timed repeat

Shapes follow the Vim-S scan (D=384 channels, N=16 states, batch 2) at L = 197 (224 px / patch 16 + cls),
1025 (512 px) and 4097 (1024 px). A linear scan keeps the per-token cost flat; the ViT block's attention is
quadratic, so the scan/ViT ratio should fall as L grows. On CUDA tensors selective_scan would dispatch to mamba-ssm;
this script pins everything to the CPU to measure the fallback.

The branch columns run one direction of a Vim-S mixer (conv, projections, scan; 384 inner channels) two ways:
"plain" is ``selective_scan`` on inputs built under autograd (which saves every intermediate), "lean" is
``recomputed_selective_scan`` (saves the branch input and chunk-end states, rebuilds the rest in backward). Saved
bytes are the distinct storages autograd keeps (``saved_tensors_hooks``); times are medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
from machine import machine_line, pin_threads  # benchmarks/machine.py: scripts run as python benchmarks/<name>.py

from rlhf_rrg.models.mamba import MambaMixer
from rlhf_rrg.models.scan import recomputed_selective_scan, selective_scan
from rlhf_rrg.models.vit import ViTBlock

LENGTHS = (197, 1025, 4097)
WIDTH, STATE, BATCH = 384, 16, 2


def time_fwd_bwd(steps: list[Callable[[], torch.Tensor]], repeats: int) -> list[float]:
    """Median wall time of forward+backward of each step after one warm-up call, repeats interleaved."""
    times: list[list[float]] = [[] for _ in steps]
    for step in steps:
        step().sum().backward()
    for _ in range(repeats):
        for step, record in zip(steps, times, strict=True):
            start = time.perf_counter()
            step().sum().backward()
            record.append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def saved_bytes(step: Callable[[], torch.Tensor]) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step().sum().backward()
    return sum(storages.values())


def scan_step(length: int) -> Callable[[], torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    u, delta, z = leaf(BATCH, WIDTH, length), leaf(BATCH, WIDTH, length, scale=0.5), leaf(BATCH, WIDTH, length)
    A = (-torch.rand(WIDTH, STATE, generator=g) - 0.1).requires_grad_()
    B, C = leaf(BATCH, STATE, length), leaf(BATCH, STATE, length)
    D, bias = leaf(WIDTH), leaf(WIDTH, scale=0.1)
    return lambda: selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)


def vit_step(length: int) -> Callable[[], torch.Tensor]:
    torch.manual_seed(0)
    block = ViTBlock(WIDTH, num_heads=6, intermediate_size=4 * WIDTH)
    x = torch.randn(BATCH, length, WIDTH, requires_grad=True)
    return lambda: block(x)


def branch_steps(length: int) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """(plain, lean) forward of one Vim-S mixer direction on the same weights and inputs."""
    torch.manual_seed(0)
    mixer = MambaMixer(WIDTH // 2, d_state=STATE, bidirectional=False)
    x, z = (torch.randn(BATCH, WIDTH, length, requires_grad=True) for _ in range(2))
    params = (mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias,
              mixer.A_log, mixer.D)

    def plain() -> torch.Tensor:
        return selective_scan(*mixer._scan_inputs(False, x, z, *params), delta_softplus=True)

    def lean() -> torch.Tensor:
        return recomputed_selective_scan(partial(mixer._scan_inputs, False), x, z, *params, delta_softplus=True)

    return plain, lean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed repeat per point instead of three")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: no oversubscription)")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    pin_threads(args.threads)

    print(f"selective scan fwd+bwd, D={WIDTH} N={STATE} batch={BATCH}; {machine_line()}")
    print(f"{'L':>6} {'scan s':>9} {'x L=197':>8} {'us/token':>9} {'ViT blk s':>10} {'scan/ViT':>9} "
          f"{'lean/plain time':>15} {'lean/plain saved':>16}")
    base = None
    for length in LENGTHS:
        plain, lean = branch_steps(length)
        scan_s, vit_s, plain_s, lean_s = time_fwd_bwd([scan_step(length), vit_step(length), plain, lean], repeats)
        base = base or scan_s
        per_token_us = scan_s / (BATCH * length) * 1e6
        print(f"{length:>6} {scan_s:>9.4f} {scan_s / base:>8.2f} {per_token_us:>9.2f} {vit_s:>10.4f} "
              f"{scan_s / vit_s:>9.2f} {lean_s / plain_s:>15.2f} {saved_bytes(lean) / saved_bytes(plain):>16.2f}")


if __name__ == "__main__":
    main()
