import platform

import torch

from rlhf_rrg.numerics import KERNEL_VARIABLES, cpu_name, numerics_line

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz

processor\t: 1
cpu family\t: 7
model name\t: another block
"""


def test_cpu_name_reads_the_first_processor_block(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert cpu_name(path) == "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz (family 6, model 85)"
    path.write_text("processor\t: 0\nmodel name\t: ARM Neoverse\n")  # no family: the name alone
    assert cpu_name(path) == "ARM Neoverse"
    assert cpu_name(tmp_path / "missing") == (platform.machine() or "unknown CPU")


def test_numerics_line_names_the_kernels_torch_uses_and_the_variables_that_chose_them(monkeypatch):
    for name in KERNEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    line = numerics_line()
    assert f"torch {torch.__version__}" in line
    assert f"CPU kernels {torch.backends.cpu.get_cpu_capability()}" in line
    assert ("MKL" if torch.backends.mkl.is_available() else "no MKL") in line
    assert f"{torch.get_num_threads()} torch thread(s)" in line and "=" not in line
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert numerics_line() == f"{line}, MKL_CBWR=AVX2, ONEDNN_MAX_CPU_ISA=AVX2"


def test_numerics_line_names_the_gpu_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "GPU NVIDIA H100 80GB HBM3 (CUDA 12.8)" in numerics_line()
