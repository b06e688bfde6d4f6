"""Training cost of the Mamba encoders versus a ViT of equal width and depth at 224, 448 and 896 px.

    python benchmarks/bench_encoder.py              # 3 timed repeats per point, width 192, depth 6, batch 1
    python benchmarks/bench_encoder.py --quick      # 1 timed repeat, 224 and 448 px only
    python benchmarks/bench_encoder.py --depth 24   # Vim-S depth (slow on 2 cores)

For each encoder and resolution (patch 16: 197 / 785 / 3137 tokens) one forward+backward of the whole encoder is
measured three ways, each printed as the ratio to the ViT at the same resolution:

- time: median of interleaved repeats after a warm-up, in this process;
- peak memory: the rise of the resident set size above its level before the forward, read from the kernel's
  high-water mark (``VmHWM`` reset through ``/proc/self/clear_refs``) in a fresh subprocess per point. Torch's CPU
  allocator does not cache, and ``MALLOC_MMAP_THRESHOLD_`` is fixed so that glibc maps every block above 64 KiB
  and returns it on free: the peak RSS then follows the peak of live tensors. tracemalloc would not see them.
- saved activations: bytes of the distinct storages autograd keeps for backward (``saved_tensors_hooks``; weights and
  the input image excluded), exact and noise-free; it is the part of the peak that grows with depth.

Saved activations grow with depth while one layer's backward temporaries do not, so the memory ratio falls with
depth; depth 6 keeps the run to minutes on 2 cores, and the ratio at Vim's depth 24 is lower still.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import machine_line, pin_threads  # benchmarks/machine.py: scripts run as python benchmarks/<name>.py

from rlhf_rrg.models.vision import RRGVisionConfig, RRGVisionModel

REPO = Path(__file__).resolve().parents[1]
ENCODERS = ("vit", "vim", "arm")
WIDTH, BATCH = 192, 1


def build(encoder: str, px: int, depth: int) -> tuple[RRGVisionModel, torch.Tensor]:
    torch.manual_seed(0)
    config = RRGVisionConfig(encoder_type=encoder, image_size=px, patch_size=16, hidden_size=WIDTH,
                             num_hidden_layers=depth, num_attention_heads=3, intermediate_size=4 * WIDTH)
    return RRGVisionModel(config), torch.randn(BATCH, 3, px, px)


def fwd_bwd(model: RRGVisionModel, pixels: torch.Tensor) -> None:
    model(pixels).last_hidden_state.square().mean().backward()


def saved_bytes(model: RRGVisionModel, pixels: torch.Tensor) -> int:
    """Bytes of the distinct activation storages autograd saves (weights and the input image excluded)."""
    held = {p.untyped_storage().data_ptr() for p in model.parameters()} | {pixels.untyped_storage().data_ptr()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in held:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(pixels).last_hidden_state.square().mean()
    out.backward()
    return sum(storages.values())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_peak(encoder: str, px: int, depth: int) -> None:
    """Runs in the subprocess: prints the RSS rise (bytes) of one forward+backward as JSON."""
    model, pixels = build(encoder, px, depth)
    fwd_bwd(model, pixels)  # warm-up: lazily initialised kernels and gradient buffers are not activations
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fwd_bwd(model, pixels)
    print(json.dumps({"peak_bytes": (_status_kib("VmHWM") - before) * 1024}))


def peak_bytes(encoder: str, px: int, depth: int, threads: int) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", encoder, str(px), "--depth", str(depth),
           "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def median_time(models: dict[str, tuple[RRGVisionModel, torch.Tensor]], repeats: int) -> dict[str, float]:
    """Median fwd+bwd seconds per encoder, repeats interleaved so that load changes hit every encoder alike."""
    for model, pixels in models.values():
        fwd_bwd(model, pixels)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, (model, pixels) in models.items():
            start = time.perf_counter()
            fwd_bwd(model, pixels)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed repeat, 224 and 448 px only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: no oversubscription)")
    parser.add_argument("--depth", type=int, default=6, help="layers of every encoder (default 6)")
    parser.add_argument("--child", nargs=2, metavar=("ENCODER", "PX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    pin_threads(args.threads)
    if args.child:
        child_peak(args.child[0], int(args.child[1]), args.depth)
        return
    repeats, sizes = (1, (224, 448)) if args.quick else (3, (224, 448, 896))
    print(f"encoder fwd+bwd, width {WIDTH}, depth {args.depth}, batch {BATCH}, patch 16; {machine_line()}")
    print(f"{'px':>4} {'tokens':>6} {'encoder':>7} {'time s':>8} {'peak MiB':>9} {'saved MiB':>9} "
          f"{'time/ViT':>8} {'peak/ViT':>8} {'saved/ViT':>9}")
    for px in sizes:
        models = {name: build(name, px, args.depth) for name in ENCODERS}
        times = median_time(models, repeats)
        peaks = {name: peak_bytes(name, px, args.depth, args.threads) for name in ENCODERS}
        saved = {name: saved_bytes(*models[name]) for name in ENCODERS}
        for name in ENCODERS:
            tokens = (px // 16) ** 2 + (name != "arm")
            print(f"{px:>4} {tokens:>6} {name:>7} {times[name]:>8.3f} {peaks[name] / 2**20:>9.1f} "
                  f"{saved[name] / 2**20:>9.1f} {times[name] / times['vit']:>8.2f} "
                  f"{peaks[name] / peaks['vit']:>8.2f} {saved[name] / saved['vit']:>9.2f}")
    print(f"load average after the run: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
