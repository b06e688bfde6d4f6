"""Where an RL step's time goes (generation, reward, update), how many images its vision tower encodes, and how many
device-to-host syncs it makes. For PPO the update includes the no-grad forwards for old log-probs, values and
reference log-probs; for SCST the greedy baseline is in generation.

    python benchmarks/bench_rl_step.py                       # PPO, tiny model, clinical_offline reward
    python benchmarks/bench_rl_step.py --algo scst --steps 6 --max-new-tokens 80
    python benchmarks/bench_rl_step.py --export runs/demo/sft/export --data-dir data/synthetic
    python benchmarks/bench_rl_step.py --compare-reencode    # also time the step with the tower re-encoding

Without ``--export`` a random-weight tiny report generator is exported to a temporary folder, and without
``--data-dir`` a small synthetic dataset is written there too. The stage itself runs (``stages/ppo.py`` ``main`` on
its debug config); each share is the mean of its ``perf/*_s`` metric over the steps after the first (warm-up).

Counted inside ``rl_step`` only (evaluation excluded), per step:

- images encoded: rows that reach the tower's encoder, against the distinct images of the step's batch (every
  context and query image of every study);
- syncs: calls of ``Tensor.item/tolist/cpu/numpy`` and ``bool/float/int`` of a tensor (each a device-to-host wait
  on an accelerator), split by the first caller outside torch into this project's code and libraries
  (transformers' ``generate`` checks for finished rows once per token). torch.optim's own ``.item()`` on Adam's
  step counters is not counted: those counters live on the host.

``--compare-reencode`` runs the same steps a second time with features not reused (every forward re-encodes, the
behaviour before encode-once) and prints the step-time ratio.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from machine import machine_line, pin_threads  # benchmarks/machine.py: scripts run as python benchmarks/<name>.py

from rlhf_rrg.config import load_config
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.export.save import save_generator
from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.prompting.generator import PromptingConfig, ReportGenerator
from rlhf_rrg.retrieval.context import ContextConfig
from rlhf_rrg.runroot import mark_export_complete
from rlhf_rrg.testing.stage_scripts import load_stage
from rlhf_rrg.testing.tiny_models import tiny_rrg

REPO = Path(__file__).resolve().parents[1]
PHASES = ("generate", "reward", "update")
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def tiny_export(out: Path) -> Path:
    tiny = tiny_rrg(out / "tiny", encoder_type="vit")
    generator = ReportGenerator(tiny.model, tiny.processor, PromptingConfig(context=ContextConfig(mode="none")))
    export = save_generator(generator, out / "export")
    mark_export_complete(export, {"stage": "benchmark"})
    return export


class StepCounters:
    """Syncs (ours / library) and encoded vs distinct images, accumulated while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.syncs: collections.Counter[str] = collections.Counter()
        self.encoded = 0
        self.distinct = 0

    def caller(self) -> str | None:
        frames = traceback.extract_stack()[:-2]
        if any("/torch/optim/" in f.filename for f in frames):
            return None  # Adam's host-side step counters
        outside = next(f for f in reversed(frames) if "/torch/" not in f.filename)
        return "ours" if str(REPO) in outside.filename and "/.venv/" not in outside.filename else "library"

    @contextmanager
    def patched(self) -> Iterator[None]:
        originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

        def counted(name: str):
            def method(tensor, *args, **kwargs):
                if self.active and (who := self.caller()) is not None:
                    self.syncs[who] += 1
                return originals[name](tensor, *args, **kwargs)
            return method

        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, counted(name))
        try:
            yield
        finally:
            for name, method in originals.items():
                setattr(torch.Tensor, name, method)


def run_stage(stage, args, data: Path, export: Path, run_root: Path, counters: StepCounters) -> list[dict]:
    """Runs the stage with ``rl_step`` instrumented; returns the per-step metric rows after the warm-up step."""
    rl_step = stage.rl_step
    hooked: set[int] = set()

    def instrumented(cfg, accelerator, policy, unwrapped, *rest):
        tower = unwrapped.generator.vision_tower
        if id(tower) not in hooked:
            hooked.add(id(tower))
            tower.encoder.register_forward_hook(
                lambda _m, inputs, _o: setattr(counters, "encoded", counters.encoded + counters.active
                                               * inputs[0].shape[0]))
        batch = rest[-1]
        counters.distinct += unwrapped.generator.images(batch).shape[:2].numel()
        counters.active = True
        try:
            return rl_step(cfg, accelerator, policy, unwrapped, *rest)
        finally:
            counters.active = False

    stage.rl_step = instrumented
    cfg = load_config(stage.PPOStageConfig, REPO / "stages" / "configs" / "ppo" / "debug.yaml", [
        "--run.run_root", str(run_root), "--run.init_from", str(export), "--algo", args.algo,
        "--data.annotation_path", str(data / "annotation.json"), "--data.image_root", str(data / "images"),
        "--train.max_steps", str(args.steps), "--train.batch_size", str(args.batch_size),
        "--generation.max_new_tokens", str(args.max_new_tokens),
        "--reward.funcs", f"[{args.reward}]", "--reward.weights", "[1.0]",
        "--eval.max_samples", "1", "--eval.max_new_tokens", "1", "--checkpoint.save_every", "0"])
    try:
        with counters.patched():
            stage.main(cfg)
    finally:
        stage.rl_step = rl_step
    return [r for r in read_jsonl(run_root / "ppo" / "metrics.jsonl") if "perf/generate_s" in r][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=("ppo", "scst"), default="ppo")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--reward", default="clinical_offline", help="reward.funcs entry")
    parser.add_argument("--export", type=Path, help="SFT export (default: a random tiny generator)")
    parser.add_argument("--data-dir", type=Path, help="folder with annotation.json and images/")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: no oversubscription)")
    parser.add_argument("--compare-reencode", action="store_true",
                        help="run again with every forward re-encoding its images and print the step-time ratio")
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("need --steps >= 2 (the first step is warm-up)")
    pin_threads(args.threads)
    print(machine_line())

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        data = args.data_dir
        if data is None:
            data = tmp_dir / "data"
            write_synthetic_dataset(data, SyntheticConfig(n_train=64, n_val=8, n_test=8, image_size=64, seed=0))
        export = args.export or tiny_export(tmp_dir)
        stage = load_stage("ppo")
        counters = StepCounters()
        start = time.perf_counter()
        rows = run_stage(stage, args, data, export, tmp_dir / "run", counters)
        total = time.perf_counter() - start
        reencode_rows = None
        if args.compare_reencode:
            stage.encode_batch_images = lambda *_: None  # generate_rollout would encode again: disable it too
            rollout_module = sys.modules["rlhf_rrg.rl.rollout"]
            encode = rollout_module.encode_batch_images
            rollout_module.encode_batch_images = lambda *_: None
            try:
                reencode_rows = run_stage(stage, args, data, export, tmp_dir / "run_reencode", StepCounters())
            finally:
                rollout_module.encode_batch_images = encode

    means = {p: sum(r[f"perf/{p}_s"] for r in rows) / len(rows) for p in PHASES}
    step = sum(means.values())
    print(f"{args.algo}: batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, reward {args.reward}; "
          f"{len(rows)} timed steps, {step:.3f} s/step in the three phases ({total:.1f} s for the whole run)")
    for phase in PHASES:
        print(f"  {phase:<8} {means[phase]:.3f} s  share {means[phase] / step:.2f}")
    steps = args.steps
    print(f"images encoded per step {counters.encoded / steps:.1f}, distinct images per step "
          f"{counters.distinct / steps:.1f}, ratio {counters.encoded / counters.distinct:.2f}")
    print(f"host syncs per step: {counters.syncs['ours'] / steps:.1f} in this project's code, "
          f"{counters.syncs['library'] / steps:.1f} in libraries (max_new_tokens {args.max_new_tokens})")
    if reencode_rows:
        old = sum(sum(r[f"perf/{p}_s"] for p in PHASES) for r in reencode_rows) / len(reencode_rows)
        print(f"step time encode-once / re-encode: {step / old:.2f} ({step:.3f} s vs {old:.3f} s)")


if __name__ == "__main__":
    main()
