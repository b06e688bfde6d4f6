"""What decides a CPU run's floating-point results besides the code, the data and the seed: one line per run.

The same commit and seed give other numbers on another CPU because torch's own kernels (reductions, softmax, ...),
MKL's GEMMs and oneDNN's convolutions pick their code path by instruction set, and each path sums in its own order.
On one AVX-512 machine, restricting all three to AVX2 (``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2``, what an AVX2-only CPU runs) changed the demo's SFT as much as a new seed does (README,
Benchmarks). Each stage logs this line (``run/numerics``) and every benchmark prints it, so two runs' numbers can be
told apart by machine before they are compared.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# Environment variables that choose kernels by instruction set (or fix MKL's choice, MKL_CBWR).
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and, on x86, its family (``AMD EPYC (family 25, model 17)``); the platform's machine
    name where ``/proc/cpuinfo`` is missing."""
    fields: dict[str, str] = {}
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                if fields:
                    break  # the first processor's block is enough
                continue
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.machine() or "unknown CPU"
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def numerics_line() -> str:
    """torch version, the CPU kernels torch dispatches to, its BLAS, the CPU, torch threads, the GPU and CUDA version
    where there is one, and any kernel-choosing environment variable that is set."""
    blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    gpu = [f"GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"] if torch.cuda.is_available() else []
    chosen = [f"{name}={os.environ[name]}" for name in KERNEL_VARIABLES if os.environ.get(name)]
    return ", ".join([f"torch {torch.__version__}", f"CPU kernels {torch.backends.cpu.get_cpu_capability()}", blas,
                      cpu_name(), f"{torch.get_num_threads()} torch thread(s)", *gpu, *chosen])
