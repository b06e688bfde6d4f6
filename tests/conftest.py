"""Settings every test process, and every process a test starts, shares."""

import os

from rlhf_rrg.distributed import torch_extensions_dir


def pytest_configure(config):
    # One folder for DeepSpeed's JIT ops (its CPU comm op, cpu_adam) across accelerate launches, torchrun and plain
    # scripts that start DeepSpeed: with a second folder the comm op was built twice, a minute of CI's two cores.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
