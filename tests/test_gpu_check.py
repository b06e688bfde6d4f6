"""The GPU check (benchmarks/gpu_check.py, scripts/gpu_check.sh) smoke-run on CPU: the tiny shape for one timed step,
the scan check against a stand-in kernel (mamba-ssm's needs CUDA), and each check isolated from the others' failures.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


@pytest.fixture
def gpu_check(monkeypatch):
    """benchmarks/gpu_check.py as a fresh module (it imports its sibling ``machine`` as a script would)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def stand_in_kernel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The S6 recurrence as a per-step loop (autograd does the backward): what mamba-ssm's kernel computes."""
    dt = delta + delta_bias[:, None]
    dt = torch.nn.functional.softplus(dt) if delta_softplus else dt
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, -1) * torch.nn.functional.silu(z)


def parse(text: str) -> list[dict[str, str]]:
    """The markdown table's rows as dicts keyed by its header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "")) == {"-"}
    cells = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:])
    return [dict(zip(header, row, strict=True)) for row in cells]


def smoke_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--device", "cpu", "--steps", "1", "--checks", "sft,ppo,scan", "--scan-lengths", "12",
            "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "table.md"), *extra]


def test_cpu_smoke_run_fills_every_row(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "mamba_kernel", lambda device: (stand_in_kernel, ""))
    gpu_check.main(smoke_args(tmp_path))
    printed = capsys.readouterr().out
    assert (tmp_path / "table.md").read_text() == printed
    assert "fp32 (bf16 fell back to fp32 on CPU" in printed.splitlines()[0]
    rows = parse(printed)
    assert [(r["check"], r["shape"], r["status"]) for r in rows] == [
        ("sft", "tiny", "ok"), ("ppo", "tiny", "ok"), ("sft", "0.5b", "SKIPPED"), ("ppo", "0.5b", "SKIPPED"),
        ("scan", "Vim-S L=12", "ok")]
    sft, ppo, _, skipped, scan = rows
    assert skipped["note"] == "0.5b on CPU only when --shapes names it"
    for row in (sft, ppo):
        # one warm-up step and one timed step of the real stage, in fp32 as its model ran
        assert (row["dtype"], row["steps"], row["peak GiB"]) == ("fp32", "1+1", "-")
        assert float(row["s/step"]) > 0 and float(row["tokens/s"].replace(",", "")) > 0
    assert "2 prompts x 4 samples" in ppo["note"] and "generate" in ppo["note"]
    # our chunked scan against the per-step loop: equal to fp32 rounding, forward and backward
    assert scan["max diff"].startswith("y ") and "grads" in scan["max diff"]
    y_abs = float(scan["max diff"].split()[1])
    assert 0 <= y_abs < 1e-4


def test_a_failing_check_is_reported_and_the_others_still_run(gpu_check, monkeypatch, tmp_path, capsys):
    def out_of_memory(run, shape, row):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n(see the allocator's stats)")

    def wrong_kernel(*args, **kwargs):  # 1% off: beyond the output tolerance
        return stand_in_kernel(*args, **kwargs) * 1.01

    monkeypatch.setitem(gpu_check.CHECKS, "sft", out_of_memory)
    monkeypatch.setattr(gpu_check, "mamba_kernel", lambda device: (wrong_kernel, ""))
    rows = gpu_check.main(smoke_args(tmp_path, "--shapes", "tiny"))
    table = parse(capsys.readouterr().out)
    assert [(r.check, r.shape, r.status) for r in rows] == [
        ("sft", "tiny", "FAILED"), ("ppo", "tiny", "ok"), ("scan", "Vim-S L=12", "FAILED")]
    assert [r["status"] for r in table] == ["FAILED", "ok", "FAILED"]
    assert table[0]["note"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert table[1]["steps"] == "1+1"
    assert table[2]["note"].startswith("AssertionError: kernel and our scan differ beyond tolerance: y ")
    assert parse((tmp_path / "table.md").read_text()) == table


def test_checks_left_after_the_budget_are_skipped(gpu_check, tmp_path, capsys):
    gpu_check.main(["--device", "cpu", "--shapes", "tiny", "--budget-s", "1e-9", "--checks", "sft,zero2", "--out",
                    str(tmp_path / "t.md")])
    rows = parse((tmp_path / "t.md").read_text())
    assert [(r["check"], r["status"]) for r in rows] == [("sft", "SKIPPED"), ("zero2", "SKIPPED")]
    assert rows[0]["note"] == "the time budget (--budget-s) was spent before this check"


def test_the_script_is_valid_bash_and_refuses_a_machine_without_cuda(tmp_path):
    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is not reachable")
    out = tmp_path / "sub" / "check.md"
    result = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, timeout=120,
                            env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "torch sees no CUDA device" in result.stderr and not out.exists()
