"""One GPU check of the training paths that CPU tests cannot reach: bf16 SFT and PPO steps on the tiny LLM and on a
0.5B-shaped Qwen2 (peak memory, tokens/s), one step under DeepSpeed ZeRO-2 and ZeRO-3, and mamba-ssm's selective
scan kernel against the project's own scan. Everything is random-init and written to a temporary folder: no downloads.

    bash scripts/gpu_check.sh [OUT]                        # the GPU run, under a wall-clock guard (OUT: gpu_check.md)
    python benchmarks/gpu_check.py --out gpu_check.md      # the same without the guard
    python benchmarks/gpu_check.py --device cpu --steps 1  # CPU smoke run: fp32, tiny shape, ZeRO on the CPU configs

Rows (each check runs on its own: a failure marks its row FAILED with a one-line reason, the traceback goes to stderr,
and the remaining checks still run; the table is rewritten to ``--out`` after every check, so a run stopped from
outside leaves the rows it finished and marks the rest PENDING):

- ``sft``: the SFT stage (``stages/sft.py`` ``main`` on ``stages/configs/sft/debug.yaml``, full fine-tuning with the
  tiny Vim encoder, without retrieved context, clue head or self-refining term) for one warm-up step and ``--steps``
  timed ones. s/step runs from the step's loss to the end of its optimizer step; tokens/s counts the non-padding
  tokens of the teacher-forced batches (image placeholders, prompt and report).
- ``ppo``: the RL stage (``stages/ppo.py`` ``main`` on ``stages/configs/ppo/debug.yaml``: PPO, 4 samples per study,
  value head, reference policy, the weight-free clinical reward) from a random export of the same shape, again one
  warm-up and ``--steps`` timed steps. s/step is the whole RL step (rollout, reward, update); tokens/s counts the
  generated response tokens; the note gives each phase's share.
- ``zero2`` / ``zero3``: ``accelerate launch --config_file accelerate_configs/zero{2,3}.yaml --num_processes 1
  stages/sft.py`` for one step of the tiny shape (``zero{2,3}_cpu.yaml`` with ``--device cpu``). ok means the stage
  logged that ZeRO stage, one process and a finite loss.
- ``scan``: ``mamba_ssm``'s ``selective_scan_fn`` (the kernel ``rlhf_rrg.models.scan`` dispatches CUDA tensors to)
  against the project's pure-torch scan on the same device, fp32, Vim-S shapes (384 channels, 16 states, batch 2):
  the max abs difference of the output and of every input gradient, each relative to the kernel's largest magnitude
  (FAILED beyond 1e-3 for the output, 1e-2 for gradients), and the median fwd+bwd times. SKIPPED when mamba-ssm
  does not import (the reason is given).

Columns: steps ``1+N`` is one warm-up step and N timed ones (s/step and tokens/s are over the timed ones); peak GiB is
``torch.cuda.max_memory_allocated`` from the start of the first step to the end of the last (weights, gradients and
optimizer state included; the note adds what was allocated before the first step), not measured on CPU; dtype is that
of the LLM's weights as the stage ran them. Stage output goes to stderr, the table alone to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
VISION = "tiny-vim"
SFT_CONFIG, PPO_CONFIG = REPO / "stages/configs/sft/debug.yaml", REPO / "stages/configs/ppo/debug.yaml"
# The shapes of Qwen2.5-0.5B (494M parameters, tied embeddings); "tiny" is the project's in-process tiny LLM.
SHAPES: dict[str, dict[str, Any] | None] = {
    "tiny": None,
    "0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True},
}
CHECK_NAMES = ("sft", "ppo", "scan", "zero2", "zero3")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
SHORT_DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}
SCAN_WIDTH, SCAN_STATE, SCAN_BATCH = 384, 16, 2
SCAN_TOLERANCE = {"y": 1e-3, "grad": 1e-2}


@dataclass(frozen=True)
class Sizes:
    """Per-device batch settings: realistic on a GPU, seconds-long on a CPU."""

    sft_batch: int
    ppo_batch: int  # prompts per RL step; the debug config samples 4 reports each (minibatches of 8)
    max_new_tokens: int


SIZES = {"cuda": Sizes(sft_batch=8, ppo_batch=4, max_new_tokens=60),
         "cpu": Sizes(sft_batch=4, ppo_batch=2, max_new_tokens=8)}


class CheckSkipped(Exception):
    """A check that cannot run here; its message is the reason."""


@dataclass
class Row:
    check: str
    shape: str
    dtype: str = "-"
    steps: str = "-"
    step_s: float | None = None
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    max_diff: str = "-"
    status: str = "PENDING"
    note: str = "not reached (the run stopped before this check)"


COLUMNS = ("check", "shape", "dtype", "steps", "s/step", "tokens/s", "peak GiB", "max diff", "status", "note")


def _cell(value: Any, fmt: str = "") -> str:
    if value is None:
        return "-"
    return (format(value, fmt) if fmt else str(value)).replace("|", "/").replace("\n", " ")


def table(rows: list[Row], caption: str) -> str:
    """The markdown table (one caption line above it)."""
    lines = [caption, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = (r.check, r.shape, r.dtype, r.steps, _cell(r.step_s, ".4g"), _cell(r.tokens_per_s, ",.0f"),
                 _cell(r.peak_gib, ".2f"), r.max_diff, r.status, r.note)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``, short enough for a table cell."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    text = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ----------------------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """What every check shares: device, dtype, step count, the working folder and its synthetic data."""

    device: str
    dtype: str  # "bf16" | "fp32"
    steps: int
    work: Path
    sizes: Sizes
    deadline: float | None = None  # time.monotonic() after which no check starts
    _llm_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        data = self.work / "data"
        if not (data / "annotation.json").is_file():
            from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset

            write_synthetic_dataset(data, SyntheticConfig(n_train=32, n_val=8, n_test=0, image_size=64, seed=0))
        return data

    def data_args(self) -> list[str]:
        return ["--data.annotation_path", str(self.data / "annotation.json"), "--data.image_root",
                str(self.data / "images")]

    def reports(self) -> list[str]:
        return [s["report"] for s in json.loads((self.data / "annotation.json").read_text())["train"]]

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def llm_args(self, shape: str) -> list[str]:
        """Stage overrides that select the shape's LLM (and the weight dtype)."""
        args = ["--model.llm_dtype", DTYPES[self.dtype]]
        if SHAPES[shape] is None:
            return [*args, "--model.llm", "tiny"]
        # The qwen2.5-0.5b shortcut also checks that the folder holds a Qwen2 of width 896.
        return [*args, "--model.llm", "qwen2.5-0.5b", "--model.llm_path", str(self.llm_dir(shape))]

    def llm_dir(self, shape: str) -> Path:
        if shape not in self._llm_dirs:
            self._llm_dirs[shape] = write_random_llm(self.work / f"llm_{shape}", SHAPES[shape], self.reports(),
                                                     DTYPES[self.dtype])
        return self._llm_dirs[shape]


def write_random_llm(folder: Path, shape: dict[str, Any], texts: list[str], dtype: str) -> Path:
    """A random-init Qwen2 of ``shape`` saved as a pretrained-LLM folder, with a word tokenizer over ``texts`` padded
    with filler words to exactly ``vocab_size`` entries (so the model keeps its full embedding and logits size)."""
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rlhf_rrg.models.llm_configs import DTYPES as TORCH_DTYPES
    from rlhf_rrg.models.tokenizer import UNK_TOKEN, build_word_tokenizer

    tokenizer = build_word_tokenizer(texts)
    # Filler words go straight into the WordLevel vocabulary: its trainer caps a vocabulary at 30000 entries.
    vocab = tokenizer.backend_tokenizer.get_vocab()
    words = len(vocab)
    vocab.update({f"filler{i}": words + i for i in range(shape["vocab_size"] - words)})
    tokenizer.backend_tokenizer.model = WordLevel(vocab, unk_token=UNK_TOKEN)
    if len(tokenizer) != shape["vocab_size"]:
        raise RuntimeError(f"padded word tokenizer has {len(tokenizer)} entries, expected {shape['vocab_size']}")
    tokenizer.save_pretrained(folder)
    config = Qwen2Config(**shape, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[dtype]).save_pretrained(folder)
    return folder


def random_export(run: Run, shape: str, out: Path) -> Path:
    """A random report generator of ``shape`` (no context) exported as the SFT stage would: the RL stage's input."""
    from transformers import AutoTokenizer

    from rlhf_rrg.export.save import save_generator
    from rlhf_rrg.models.rrg import LoraSettings, RRGModelConfig, build_processor, build_rrg_model
    from rlhf_rrg.models.tokenizer import build_word_tokenizer
    from rlhf_rrg.prompting.generator import PromptingConfig, ReportGenerator
    from rlhf_rrg.retrieval.context import ContextConfig
    from rlhf_rrg.runroot import mark_export_complete

    if SHAPES[shape] is None:
        tokenizer = build_word_tokenizer(run.reports())
        model_cfg = RRGModelConfig(vision=VISION, llm="tiny", llm_dtype=DTYPES[run.dtype],
                                   lora=LoraSettings(enabled=False))
    else:
        tokenizer = AutoTokenizer.from_pretrained(run.llm_dir(shape), local_files_only=True)
        model_cfg = RRGModelConfig(vision=VISION, llm="qwen2.5-0.5b", llm_path=str(run.llm_dir(shape)),
                                   llm_dtype=DTYPES[run.dtype], lora=LoraSettings(enabled=False))
    model = build_rrg_model(model_cfg, tokenizer)
    generator = ReportGenerator(model, build_processor(model, tokenizer),
                                PromptingConfig(context=ContextConfig(mode="none")))
    export = save_generator(generator, out)
    mark_export_complete(export, {"stage": "gpu_check"})
    return export


# ---------------------------------------------------------------------------------------------- measurement


class StepMeter:
    """Per-step wall time (device-synchronised), tokens, and the peak allocated memory from the first step on."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.times: list[float] = []
        self.tokens: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.peak: int | None = None
        self.base: int | None = None  # allocated when the first step began (weights, reference policy, leftovers)
        self.weight_dtype: torch.dtype | None = None  # of the LLM's embedding, read from the running model
        self._start: float | None = None
        self._tokens: Any = 0

    def start(self) -> None:
        self.run.sync()
        if not self.times and self._start is None and self.run.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self._start, self._tokens = time.perf_counter(), 0

    @property
    def active(self) -> bool:
        return self._start is not None

    def add_tokens(self, count: Any) -> None:
        self._tokens = self._tokens + count  # a device tensor until stop(): no sync inside the step

    def stop(self, tokens: float | None = None, phases: dict[str, float] | None = None) -> None:
        self.run.sync()
        self.times.append(time.perf_counter() - self._start)
        self.tokens.append(float(self._tokens if tokens is None else tokens))
        self.phases.append(phases or {})
        self._start = None
        if self.run.device == "cuda":
            self.peak = max(self.peak or 0, torch.cuda.max_memory_allocated())

    def fill(self, row: Row, note: str) -> None:
        """Mean s/step and tokens/s over the steps after the first (warm-up), the peak memory, and ``note`` (with
        the memory allocated before the first step, on CUDA)."""
        timed, tokens = self.times[1:], self.tokens[1:]
        if not timed:
            raise RuntimeError(f"{len(self.times)} step(s) measured: the stage ran no step after the warm-up")
        row.steps = f"1+{len(timed)}"
        if self.weight_dtype is not None:
            row.dtype = SHORT_DTYPES.get(self.weight_dtype, str(self.weight_dtype))
        row.step_s = sum(timed) / len(timed)
        row.tokens_per_s = sum(tokens) / sum(timed)
        row.peak_gib = None if self.peak is None else self.peak / 2**30
        row.note = note if self.base is None else f"{note}; {self.base / 2**30:.2f} GiB allocated before step 1"


@contextlib.contextmanager
def patched(module: Any, name: str, replacement: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def measured_fit(fit: Callable[..., Any], meter: StepMeter) -> Callable[..., Any]:
    """``rlhf_rrg.training.fit`` timing each step from ``step_fn`` to the end of ``optimizer.step`` and counting the
    non-padding tokens of every teacher-forced pass of the generator."""

    def wrapped(**kwargs: Any) -> Any:
        step_fn, optimizer = kwargs["step_fn"], kwargs["optimizer"]
        generator = kwargs["accelerator"].unwrap_model(kwargs["model"])
        pad = generator.processor.tokenizer.pad_token_id
        meter.weight_dtype = generator.model.get_input_embeddings().weight.dtype

        def count(_module, _args, out) -> None:
            if meter.active:
                meter.add_tokens((out.input_ids != pad).sum())

        def timed_step(model, batch):
            meter.start()
            return step_fn(model, batch)

        optimizer_step = optimizer.step

        def timed_optimizer_step(*args, **kw):
            result = optimizer_step(*args, **kw)
            meter.stop()
            return result

        hook = generator.register_forward_hook(count)
        optimizer.step = timed_optimizer_step
        try:
            return fit(**{**kwargs, "step_fn": timed_step})
        finally:
            hook.remove()
            del optimizer.step

    return wrapped


def measured_rl_step(rl_step: Callable[..., dict[str, float]], meter: StepMeter,
                     rollouts: int) -> Callable[..., dict[str, float]]:
    """``stages/ppo.py``'s ``rl_step`` timed whole; tokens are the generated ones (mean length x rollouts)."""

    def wrapped(*args: Any) -> dict[str, float]:
        meter.weight_dtype = args[3].generator.model.get_input_embeddings().weight.dtype  # args[3]: the policy
        meter.start()
        metrics = rl_step(*args)
        meter.stop(tokens=metrics["rollout/response_length"] * rollouts,
                   phases={p: metrics[f"perf/{p}_s"] for p in ("generate", "reward", "update")})
        return metrics

    return wrapped


# --------------------------------------------------------------------------------------------------- checks


def sft_overrides(run: Run, shape: str, root: Path, steps: int) -> list[str]:
    """The SFT debug config, plain (no context, clues or self-refining term), for ``steps`` steps of ``shape``."""
    return ["--run.run_root", str(root), "--run.init_from", "null", "--model.vision", VISION,
            "--prompting.context.mode", "none", "--prompting.clues.enabled", "false", "--self_refine.weight", "0",
            "--train.max_steps", str(steps), "--train.batch_size", str(run.sizes.sft_batch), "--train.log_every", "1",
            "--train.eval_every", "0", "--optim.warmup_steps", "1", "--checkpoint.save_every", "0",
            "--eval.max_samples", "2", "--eval.max_new_tokens", "4", *run.data_args(), *run.llm_args(shape)]


def sft_check(run: Run, shape: str, row: Row) -> None:
    from rlhf_rrg.config import load_config
    from rlhf_rrg.testing.stage_scripts import load_stage

    stage = load_stage("sft")
    cfg = load_config(stage.SFTStageConfig, SFT_CONFIG,
                      sft_overrides(run, shape, run.work / f"sft_{shape}", run.steps + 1))
    meter = StepMeter(run)
    with patched(stage, "fit", measured_fit(stage.fit, meter)):
        stage.main(cfg)
    meter.fill(row, f"batch {cfg.train.batch_size}, full fine-tuning, {VISION} encoder")


def ppo_check(run: Run, shape: str, row: Row) -> None:
    from rlhf_rrg.config import load_config
    from rlhf_rrg.testing.stage_scripts import load_stage

    export = random_export(run, shape, run.work / f"export_{shape}")
    stage = load_stage("ppo")
    cfg = load_config(stage.PPOStageConfig, PPO_CONFIG, [
        "--run.run_root", str(run.work / f"ppo_{shape}"), "--run.init_from", str(export), *run.data_args(),
        "--train.max_steps", str(run.steps + 1), "--train.batch_size", str(run.sizes.ppo_batch),
        "--train.eval_every", "0", "--generation.max_new_tokens", str(run.sizes.max_new_tokens),
        "--eval.max_samples", "1", "--eval.max_new_tokens", "1", "--checkpoint.save_every", "0"])
    rollouts = cfg.train.batch_size * cfg.generation.num_samples
    meter = StepMeter(run)
    with patched(stage, "rl_step", measured_rl_step(stage.rl_step, meter, rollouts)):
        stage.main(cfg)
    timed = meter.phases[1:]
    total = sum(sum(p.values()) for p in timed)
    shares = ", ".join(f"{name} {sum(p[name] for p in timed) / total:.0%}" for name in (timed or [{}])[0])
    meter.fill(row, f"{cfg.algo}: {cfg.train.batch_size} prompts x {cfg.generation.num_samples} samples, "
                    f"<= {cfg.generation.max_new_tokens} new tokens; {shares}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(device: str) -> dict[str, str]:
    """The launched stage's environment: this checkout first on the path, accelerate's settings from the launcher
    only. On CPU, ``ACCELERATE_USE_CPU`` and one torch-extensions folder per Python environment (DeepSpeed's CPU
    comm op), as ``tests/distributed`` launch them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        from rlhf_rrg.distributed import torch_extensions_dir

        env.update(ACCELERATE_USE_CPU="true", TORCH_EXTENSIONS_DIR=torch_extensions_dir())
    return env


def error_line(stderr: str) -> str:
    """The last ``SomeError: message`` line of a launched process's stderr (torchrun's rank prefix dropped), else its
    last line that is not a separator."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in stderr.splitlines()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    other = [line for line in lines if line.strip("=-*_ ")]
    return (errors or other or ["no stderr"])[-1]


def zero_check(run: Run, zero: int, row: Row) -> None:
    from rlhf_rrg.logging import read_jsonl

    config = f"zero{zero}.yaml" if run.device == "cuda" else f"zero{zero}_cpu.yaml"
    root = run.work / f"zero{zero}"
    # The GPU configs train in bf16; --dtype fp32 turns that off too (the CPU configs are fp32 already).
    precision = ["--mixed_precision", "bf16" if run.dtype == "bf16" else "no"] if run.device == "cuda" else []
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file",
               str(REPO / "accelerate_configs" / config), "--num_processes", "1", *precision, "--main_process_port",
               str(free_port()), str(REPO / "stages" / "sft.py"), "--config", str(SFT_CONFIG),
               *sft_overrides(run, "tiny", root, 1)]
    start = time.perf_counter()
    # A launch that starts just before the budget runs out still gets a minute (the shell guard bounds the whole).
    timeout = None if run.deadline is None else max(run.remaining_s(), 60.0)
    try:
        result = subprocess.run(command, cwd=REPO, env=launch_env(run.device), capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise TimeoutError(f"accelerate launch still running when the time budget ran out ({err.timeout:.0f} s)") \
            from None
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.stderr.write(f"--- {row.check}: {' '.join(command)}\n{result.stdout[-4000:]}{result.stderr[-8000:]}\n")
        raise RuntimeError(f"exit {result.returncode}: {error_line(result.stderr)}")
    records = read_jsonl(root / "sft" / "metrics.jsonl")

    def logged(key: str) -> list[Any]:
        return [r[key] for r in records if key in r]

    ran = (logged("run/zero_stage"), logged("run/num_processes"))
    if ran != ([zero], [1]):
        raise RuntimeError(f"the stage logged ZeRO stage {ran[0]} on {ran[1]} process(es), expected [{zero}] on [1]")
    losses = logged("train/loss")
    if len(losses) != 1 or not math.isfinite(losses[0]):
        raise RuntimeError(f"expected one finite train/loss, got {losses}")
    row.dtype, row.steps = run.dtype, "1"
    row.note = f"{config}, 1 process, loss {losses[0]:.3f}; launch to exit {wall:.0f} s"


def mamba_kernel(device: str) -> tuple[Callable[..., torch.Tensor] | None, str]:
    """(mamba-ssm's ``selective_scan_fn``, "") when it imports and the project dispatches to it, else (None, why)."""
    if device != "cuda":
        return None, "mamba-ssm's kernel is CUDA-only"
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, or a CUDA/triton load error of the compiled extension
        return None, f"mamba_ssm does not import ({one_line(err)})"
    from rlhf_rrg.models import scan

    if scan._mamba_ssm_scan() is not selective_scan_fn:
        raise RuntimeError("mamba_ssm imports here but rlhf_rrg.models.scan does not dispatch to its kernel")
    return selective_scan_fn, ""


def scan_inputs(length: int, device: str) -> list[torch.Tensor]:
    """(u, delta, A, B, C, D, z, delta_bias) of a Vim-S scan, fp32 leaves that need gradients (bench_scan's)."""
    g = torch.Generator().manual_seed(0)
    w, n, b = SCAN_WIDTH, SCAN_STATE, SCAN_BATCH
    cpu = [torch.randn(b, w, length, generator=g), torch.randn(b, w, length, generator=g) * 0.5,
           -torch.rand(w, n, generator=g) - 0.1, torch.randn(b, n, length, generator=g),
           torch.randn(b, n, length, generator=g), torch.randn(w, generator=g), torch.randn(b, w, length, generator=g),
           torch.randn(w, generator=g) * 0.1]
    return [t.to(device).requires_grad_() for t in cpu]


def scan_check(run: Run, length: int, row: Row) -> None:
    from rlhf_rrg.models.scan import _SelectiveScan

    kernel, reason = mamba_kernel(run.device)
    if kernel is None:
        raise CheckSkipped(reason)
    inputs = scan_inputs(length, run.device)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(run.device)
    # selective_scan() itself would dispatch these CUDA tensors to the kernel: call the fallback's Function directly.
    fns = {"kernel": lambda *a: kernel(*a, delta_softplus=True),
           "ours": lambda *a: _SelectiveScan.apply(*a, True)}
    outputs, times = {}, {}
    for name, fn in fns.items():
        y = fn(*inputs)
        outputs[name] = (y.detach(), torch.autograd.grad(y, inputs, grad_out))
        samples = []
        for _ in range(3):
            run.sync()
            start = time.perf_counter()
            torch.autograd.grad(fn(*inputs), inputs, grad_out)
            run.sync()
            samples.append(time.perf_counter() - start)
        times[name] = sorted(samples)[1]
    (y_k, g_k), (y_o, g_o) = outputs["kernel"], outputs["ours"]
    y_abs = (y_k - y_o).abs().max().item()
    y_rel = y_abs / y_k.abs().max().item()
    g_abs = max((a - b).abs().max().item() for a, b in zip(g_k, g_o, strict=True))
    g_rel = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(g_k, g_o, strict=True))
    row.dtype = "fp32"
    row.max_diff = f"y {y_abs:.1e} (rel {y_rel:.1e}); grads {g_abs:.1e} (rel {g_rel:.1e})"
    row.note = (f"fwd+bwd, median of 3: kernel {times['kernel'] * 1e3:.2f} ms, ours {times['ours'] * 1e3:.2f} ms "
                f"({times['ours'] / times['kernel']:.1f}x)")
    if y_rel > SCAN_TOLERANCE["y"] or g_rel > SCAN_TOLERANCE["grad"]:
        raise AssertionError(f"kernel and our scan differ beyond tolerance: {row.max_diff}")


# The checks by name; each fills its row or raises (CheckSkipped: SKIPPED, anything else: FAILED).
CHECKS: dict[str, Callable[[Run, Any, Row], None]] = {
    "sft": sft_check, "ppo": ppo_check, "scan": scan_check,
    "zero2": lambda run, _, row: zero_check(run, 2, row), "zero3": lambda run, _, row: zero_check(run, 3, row),
}


def plan(checks: list[str], shapes: list[str], scan_lengths: list[int]) -> list[tuple[str, Any, Row]]:
    """(check, its argument, its row) in run order: SFT and PPO per shape, the scan lengths, then ZeRO."""
    out = []
    for shape in shapes:
        out += [(c, shape, Row(c, shape)) for c in ("sft", "ppo") if c in checks]
    if "scan" in checks:
        out += [("scan", n, Row("scan", f"Vim-S L={n}")) for n in scan_lengths]
    out += [(c, None, Row(c, "tiny")) for c in ("zero2", "zero3") if c in checks]
    return out


def run_checks(run: Run, steps: list[tuple[str, Any, Row]], write: Callable[[list[Row]], None],
               skip_shapes: dict[str, str] | None = None) -> list[Row]:
    """Runs each check in turn, isolated from the others' failures; ``write(rows)`` after every change of state.
    Rows of a shape in ``skip_shapes`` are SKIPPED with the reason it maps to."""
    rows = [row for _, _, row in steps]
    for name, arg, row in steps:
        reason = (skip_shapes or {}).get(row.shape)
        if reason is None and run.remaining_s() == 0.0:
            reason = "the time budget (--budget-s) was spent before this check"
        if reason is not None:
            row.status, row.note = "SKIPPED", reason
            write(rows)
            continue
        row.note = "started; the run stopped before it finished"
        write(rows)  # what a run stopped from outside leaves
        row.note = ""
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the table only
                CHECKS[name](run, arg, row)
            row.status = "ok"
        except CheckSkipped as err:
            row.status, row.note = "SKIPPED", str(err)
        except Exception as err:
            traceback.print_exc()
            row.status, row.note = "FAILED", one_line(err)
        finally:
            gc.collect()
            if run.device == "cuda":
                torch.cuda.empty_cache()
        write(rows)
    return rows


def caption(run: Run) -> str:
    from importlib.metadata import PackageNotFoundError, version

    versions = [f"torch {torch.__version__}"]
    for package in ("transformers", "deepspeed", "mamba-ssm"):  # installed versions: importing deepspeed prints
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            versions.append(f"{package} not installed")
    if run.device == "cuda":
        where = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    if run.dtype == "bf16":
        precision = "bf16 weights under bf16 autocast"
    else:
        precision = "fp32" + (" (bf16 fell back to fp32 on CPU; --dtype bf16 forces it)" * (run.device == "cpu"))
    return f"GPU check on {where}: {', '.join(versions)}; {precision}; {time.strftime('%Y-%m-%d %H:%M')}"


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="weights and autocast (default: bf16 on cuda, fp32 "
                        "on cpu, where bf16 is slow)")
    parser.add_argument("--shapes", help=f"comma-separated, of {list(SHAPES)} (default: all; on cpu the ones "
                        "other than tiny are listed as SKIPPED)")
    parser.add_argument("--steps", type=int, default=3, help="timed SFT/PPO steps after one warm-up step (default 3)")
    parser.add_argument("--checks", default=",".join(CHECK_NAMES), help=f"comma-separated, of {list(CHECK_NAMES)}")
    parser.add_argument("--scan-lengths", default="197,1025", help="scan sequence lengths (224 px and 512 px Vim-S)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="start no check after this many seconds (0: no limit); also bounds the ZeRO launches")
    parser.add_argument("--out", type=Path, help="also write the table here (rewritten after every check)")
    parser.add_argument("--work-dir", type=Path, help="keep the runs here instead of a temporary folder")
    return parser


def main(argv: list[str] | None = None) -> list[Row]:
    parser = make_parser()
    args = parser.parse_args(argv)
    shapes = (args.shapes or ",".join(SHAPES)).split(",")
    # A CPU smoke run builds the 0.5B shape only when asked: it would take minutes there.
    skip_shapes = {} if args.shapes or args.device == "cuda" else {
        name: f"{name} on CPU only when --shapes names it" for name in SHAPES if name != "tiny"}
    checks = args.checks.split(",")
    for kind, names, known in (("shape", shapes, SHAPES), ("check", checks, CHECK_NAMES)):
        if unknown := [n for n in names if n not in known]:
            parser.error(f"unknown {kind}(s) {unknown}; choose from {list(known)}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device (--device cpu for a smoke run)")
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    deadline = time.monotonic() + args.budget_s if args.budget_s > 0 else None
    # In-process stages build their Accelerator from these (what `accelerate launch` would set).
    env = {"ACCELERATE_MIXED_PRECISION": "bf16" if dtype == "bf16" else "no", "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        stack.enter_context(environment(**env))
        run = Run(args.device, dtype, args.steps, work, SIZES[args.device], deadline)
        head = caption(run)

        def write(rows: list[Row]) -> None:
            if args.out is not None:
                args.out.write_text(table(rows, head))

        rows = run_checks(run, plan(checks, shapes, [int(n) for n in args.scan_lengths.split(",")]), write,
                          skip_shapes)
    print(table(rows, head), end="")
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(row.status == "FAILED" for row in main()) else 0)
