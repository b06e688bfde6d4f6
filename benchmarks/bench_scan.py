"""Forward+backward cost of the pure-torch selective scan versus sequence length, and versus one ViT block.

    python benchmarks/bench_scan.py           # 3 timed repeats per point
    python benchmarks/bench_scan.py --quick   # 1 timed repeat

Shapes follow the Vim-S scan (D=384 channels, N=16 states, batch 2) at L = 197 (224 px / patch 16 + cls),
1025 (512 px) and 4097 (1024 px). A linear scan keeps the per-token cost flat; the ViT block's attention is
quadratic, so the scan/ViT ratio should fall as L grows. On CUDA tensors selective_scan would dispatch to mamba-ssm;
this script pins everything to the CPU to measure the fallback.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from rlhf_rrg.models.scan import selective_scan
from rlhf_rrg.models.vit import ViTBlock

LENGTHS = (197, 1025, 4097)
WIDTH, STATE, BATCH = 384, 16, 2


def time_fwd_bwd(step: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median wall time of forward+backward after one warm-up call."""
    step().sum().backward()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step().sum().backward()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed repeat per point instead of three")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3

    print(f"selective scan fwd+bwd, D={WIDTH} N={STATE} batch={BATCH}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'L':>6} {'scan s':>9} {'x L=197':>8} {'us/token':>9} {'ViT blk s':>10} {'scan/ViT':>9}")
    base = None
    for length in LENGTHS:
        scan_s = time_fwd_bwd(scan_step(length), repeats)
        vit_s = time_fwd_bwd(vit_step(length), repeats)
        base = base or scan_s
        per_token_us = scan_s / (BATCH * length) * 1e6
        print(f"{length:>6} {scan_s:>9.4f} {scan_s / base:>8.2f} {per_token_us:>9.2f} {vit_s:>10.4f} "
              f"{scan_s / vit_s:>9.2f}")


if __name__ == "__main__":
    main()
