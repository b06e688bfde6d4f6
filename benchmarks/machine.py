"""Thread pinning and a one-line description of the machine, printed by every benchmark.

Ratios measured in one run hold on a shared machine; absolute times do not. Oversubscribed threads distort even the
ratios (on a loaded 2-core box, 2 torch threads made ``generate`` up to 132x slower than 1), so each benchmark pins
the torch thread count and prints it with the load average it ran under.
"""

from __future__ import annotations

import os

import torch

from rlhf_rrg.numerics import numerics_line


def pin_threads(threads: int) -> None:
    """Use exactly ``threads`` intra-op threads and one inter-op thread."""
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already fixed once work has run in this process
        pass


def machine_line() -> str:
    """What decides the floating-point results here (torch, its CPU kernels and BLAS, the CPU, torch threads:
    :func:`rlhf_rrg.numerics.numerics_line`), the CPU count and the 1/5/15-minute load averages."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{numerics_line()}, {os.cpu_count()} CPUs, load average {load}"
