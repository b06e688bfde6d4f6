"""Where an RL step's time goes: generation, reward, update (for PPO the update includes the no-grad
forwards for old log-probs, values and reference log-probs; for SCST the greedy baseline is in generation).

    python benchmarks/bench_rl_step.py                       # PPO, tiny model, clinical_offline reward
    python benchmarks/bench_rl_step.py --algo scst --steps 6 --max-new-tokens 80
    python benchmarks/bench_rl_step.py --export runs/demo/sft/export --data-dir data/synthetic

Without ``--export`` a random-weight tiny report generator is exported to a temporary folder, and without
``--data-dir`` a small synthetic dataset is written there too. The stage itself runs (``stages/ppo.py``
``main`` on its debug config), and each share is the mean of its ``perf/*_s`` metric over the steps after
the first (warm-up), divided by the mean sum of the three.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

from rlhf_rrg.config import load_config
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.models.generator import PromptingConfig, ReportGenerator
from rlhf_rrg.retrieval.context import ContextConfig
from rlhf_rrg.runroot import mark_export_complete
from rlhf_rrg.testing.tiny_models import tiny_rrg

REPO = Path(__file__).resolve().parents[1]
PHASES = ("generate", "reward", "update")


def tiny_export(out: Path) -> Path:
    tiny = tiny_rrg(out / "tiny", encoder_type="vit")
    generator = ReportGenerator(tiny.model, tiny.processor, PromptingConfig(context=ContextConfig(mode="none")))
    export = generator.save(out / "export")
    mark_export_complete(export, {"stage": "benchmark"})
    return export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=("ppo", "scst"), default="ppo")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--reward", default="clinical_offline", help="reward.funcs entry")
    parser.add_argument("--export", type=Path, help="SFT export (default: a random tiny generator)")
    parser.add_argument("--data-dir", type=Path, help="folder with annotation.json and images/")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        data = args.data_dir
        if data is None:
            data = tmp_dir / "data"
            write_synthetic_dataset(data, SyntheticConfig(n_train=64, n_val=8, n_test=8, image_size=64, seed=0))
        export = args.export or tiny_export(tmp_dir)
        spec = importlib.util.spec_from_file_location("stage_ppo_bench", REPO / "stages" / "ppo.py")
        stage = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = stage
        spec.loader.exec_module(stage)
        cfg = load_config(stage.PPOStageConfig, REPO / "stages" / "configs" / "ppo" / "debug.yaml", [
            "--run.run_root", str(tmp_dir / "run"), "--run.init_from", str(export), "--algo", args.algo,
            "--data.annotation_path", str(data / "annotation.json"), "--data.image_root", str(data / "images"),
            "--train.max_steps", str(args.steps), "--train.batch_size", str(args.batch_size),
            "--generation.max_new_tokens", str(args.max_new_tokens),
            "--reward.funcs", f"[{args.reward}]", "--reward.weights", "[1.0]",
            "--eval.max_samples", "1", "--eval.max_new_tokens", "1", "--checkpoint.save_every", "0"])
        start = time.perf_counter()
        stage.main(cfg)
        total = time.perf_counter() - start
        rows = [r for r in read_jsonl(tmp_dir / "run" / "ppo" / "metrics.jsonl") if "perf/generate_s" in r][1:]
    if not rows:
        raise SystemExit("need --steps >= 2 (the first step is warm-up)")
    means = {p: sum(r[f"perf/{p}_s"] for r in rows) / len(rows) for p in PHASES}
    step = sum(means.values())
    print(f"{args.algo}: batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, reward {args.reward}; "
          f"{len(rows)} timed steps, {step:.3f} s/step in the three phases ({total:.1f} s for the whole run)")
    for phase in PHASES:
        print(f"  {phase:<8} {means[phase]:.3f} s  share {means[phase] / step:.2f}")


if __name__ == "__main__":
    main()
