"""What stages 1 and 2 buy SFT: the same SFT budget from a random encoder, the pretrain export and the align export.

    python benchmarks/bench_ablation.py --sft-steps 500                      # the README table
    python benchmarks/bench_ablation.py --sft-steps 100 --fractions 1.0      # a quicker look
    python benchmarks/bench_ablation.py --stage-root rrg_home/runs/demo      # reuse a demo's pretrain/align exports
    python benchmarks/bench_ablation.py --inits random align-lowlr --seeds 0 1 2   # margins over three SFT seeds
    python benchmarks/bench_ablation.py --inits align align-serpent align-norefine --fractions 1.0   # refining terms

On the embedded default (the demo's synthetic set: 1000 train / 100 val / 200 test studies, 64 px, seed 0), this
runs stages/pretrain.py and stages/align.py on their debug configs (unless ``--stage-root`` holds their exports),
then stages/sft.py on its debug config for ``--sft-steps`` steps from each of three tiny-arm encoders (random init,
pretrain export, align export) and once more from the align export with the encoder tuned at 0.3x the lr of the rest
(``--model.vision_lr_scale 0.3``), on all training studies and on the first ``fraction`` of them (val and test
unchanged). It first prints the align stage's val retrieval from the pretrain export next to the same align run
from a random encoder (``<work>/align_random``), which is what ARM pretraining buys alignment. Each SFT run is
evaluated once, at its last step, and exports that model. Columns, on the test split:

- CE-F1: CheXpert-14 micro F1 of the greedy reports against the gold labels (rule labeler on the reports).
- clue F1: the export's TRRG clue head at its prompt threshold, against the gold labels.
- probe F1: ``rlhf_rrg.probe``'s logistic-regression probe per observation on the export's frozen pooled vision
  features, fit on the run's training studies, thresholds from val.
- bank@5: the fraction of each training study's 5 nearest memory-bank studies (SFT's starting encoder) whose
  positive findings equal its own, next to random retrieval's score (``bank/label_match@5`` in SFT's metrics).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rlhf_rrg.config import load_config
from rlhf_rrg.data.dataset import build_dataset
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.evaluation import EvalConfig
from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.probe import probe_export
from rlhf_rrg.prompting.generator import ReportGenerator
from rlhf_rrg.retrieval.metrics import LABEL_K
from rlhf_rrg.runroot import EXPORT_MARKER
from rlhf_rrg.testing.stage_scripts import load_stage

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = SyntheticConfig(n_train=1000, n_val=100, n_test=200, image_size=64, seed=0)
# SFT starting points: name -> (encoder to start from, extra SFT overrides, table label). align-lowlr tunes the
# aligned encoder at 0.3x the lr of the rest of the model, so SFT adapts it without overwriting what alignment taught.
# align-serpent swaps the demo's self-refining term (pooled hidden states, MSE, weight 0.1) for SERPENT-VLM's own
# (rlhf_rrg/losses/self_refine.py, formulation serpent, weights 0.1 and 0.05 on the LM loss); align-norefine drops it.
INITS = {"random": ("random", (), "random"), "pretrain": ("pretrain", (), "pretrain"), "align": ("align", (), "align"),
         "align-lowlr": ("align", ("--model.vision_lr_scale", "0.3"), "align, vision lr x0.3"),
         "align-serpent": ("align", ("--self_refine.formulation", "serpent", "--self_refine.weight", "0.1",
                                     "--self_refine.report_weight", "0.05"), "align, SERPENT-VLM's refining term"),
         "align-norefine": ("align", ("--self_refine.weight", "0"), "align, no refining term")}


def run_stage(name: str, data: Path, run_root: Path, *overrides: str):
    module = load_stage(name)
    config_cls = next(v for k, v in vars(module).items() if k.endswith("StageConfig"))
    cfg = load_config(config_cls, REPO / "stages" / "configs" / name / "debug.yaml", [
        "--run.run_root", str(run_root), "--data.annotation_path", str(data / "annotation.json"),
        "--data.image_root", str(data / "images"), *overrides])
    module.main(cfg)
    return cfg


def subset(data: Path, fraction: float, out: Path) -> Path:
    """The first ``fraction`` of the training studies, val and test unchanged, images shared."""
    annotation = json.loads((data / "annotation.json").read_text())
    annotation["train"] = annotation["train"][: max(1, round(fraction * len(annotation["train"])))]
    out.mkdir(parents=True, exist_ok=True)
    (out / "annotation.json").write_text(json.dumps(annotation))
    if not (out / "images").exists():
        (out / "images").symlink_to((data / "images").resolve())
    return out


def evaluate_export(run_root: Path, cfg, max_new_tokens: int) -> dict[str, float | int]:
    """Test CE-F1, clue-head F1, probe F1 (``rlhf_rrg.probe``: fit on train, thresholds from val) and the memory
    bank's label match of one SFT run, and its number of training studies."""
    generator = ReportGenerator.from_export(run_root / "sft" / "export").eval()
    splits = [build_dataset(cfg.data, split, train=False) for split in ("train", "val", "test")]
    report, _, _ = probe_export(generator, *splits, EvalConfig(split="test", max_new_tokens=max_new_tokens))
    (bank,) = [r for r in read_jsonl(run_root / "sft" / "metrics.jsonl") if f"bank/label_match@{LABEL_K}" in r]
    return {
        "ce_f1": report.micro["reports"]["f1"],
        "ce_f1_13": report.micro["reports"]["f1_13"],
        "clue_f1": report.micro["clue head"]["f1"],
        "probe_f1": report.micro["probe"]["f1"],
        "bank": bank[f"bank/label_match@{LABEL_K}"],
        "bank_chance": bank[f"bank/label_match@{LABEL_K}_chance"],
        "n_train": len(splits[0]),
    }


def print_alignment(runs: dict[str, Path]) -> None:
    """Val retrieval of each align run's exported (best ``i2t_recall@5``) evaluation, chance levels in brackets."""
    print(f"| align from | i2t R@5 | t2i R@5 | R@5 chance | i2t label match@{LABEL_K} (random) "
          f"| i2i label match@{LABEL_K} (random) |")
    print("|---|---|---|---|---|---|")
    for name, run_root in runs.items():
        evals = [r for r in read_jsonl(run_root / "align" / "metrics.jsonl") if "eval/i2t_recall@5" in r]
        best = max(evals, key=lambda r: r["eval/i2t_recall@5"])  # fit exports the first best evaluation
        m = {k.removeprefix("eval/"): v for k, v in best.items()}
        print(f"| {name} | {m['i2t_recall@5']:.2f} | {m['t2i_recall@5']:.2f} | {m['recall@5_chance']:.2f} "
              f"| {m[f'i2t_label_match@{LABEL_K}']:.3f} ({m[f'i2t_label_match@{LABEL_K}_chance']:.3f}) "
              f"| {m[f'i2i_label_match@{LABEL_K}']:.3f} ({m[f'i2i_label_match@{LABEL_K}_chance']:.3f}) |")
    print(flush=True)


def print_seed_means(ce_f1: dict[tuple[float, str], list[float]], seeds: list[int]) -> None:
    """Test CE-F1 over the seeds per row, and each start's margin over random init (same seed, then averaged)."""
    print(f"\ntest CE-F1 over seeds {seeds}: mean (min to max), margin over random init (same seed)")
    print("| SFT from | train share | CE-F1 | margin over random |")
    print("|---|---|---|---|")
    for (fraction, init), values in ce_f1.items():
        random = ce_f1.get((fraction, "random"))
        if random is None or init == "random":
            margin = ""
        else:
            margin = _spread([v - r for v, r in zip(values, random, strict=True)], "+")
        print(f"| {INITS[init][2]} | {fraction:.0%} | {_spread(values)} | {margin} |")


def _spread(values: list[float], sign: str = "") -> str:
    """``mean (min to max)``; ``sign="+"`` prints signs, for margins."""
    return f"{sum(values) / len(values):{sign}.3f} ({min(values):{sign}.3f} to {max(values):{sign}.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("rrg_home/bench_ablation"), help="output folder")
    parser.add_argument("--data-dir", type=Path, help="annotation.json + images/ (default: the demo set, written)")
    parser.add_argument("--stage-root", type=Path, help="run root with pretrain/ and align/ exports to reuse")
    parser.add_argument("--sft-steps", type=int, default=500, help="SFT steps of every run (debug.yaml: 500)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1], help="shares of training studies")
    parser.add_argument("--inits", nargs="+", choices=list(INITS), default=list(INITS), help="SFT starting points")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SFT seeds (run.seed) of every row")
    parser.add_argument("--max-new-tokens", type=int, default=80, help="test generation budget (debug.yaml: 80)")
    args = parser.parse_args()
    if args.sft_steps < 1 or not all(0 < f <= 1 for f in args.fractions):
        raise SystemExit("--sft-steps must be >= 1 and every --fractions value in (0, 1]")

    data = args.data_dir or args.work / "data"
    if not (data / "annotation.json").is_file():
        write_synthetic_dataset(data, DEMO_DATA)
    stage_root = args.stage_root or args.work / "stages"
    start = time.perf_counter()
    for stage in ("pretrain", "align"):
        if not (stage_root / stage / "export" / EXPORT_MARKER).is_file():
            run_stage(stage, data, stage_root)
    # Does ARM pretraining help alignment? The same align run from a random encoder.
    align_random = args.work / "align_random"
    if not (align_random / "align" / "export" / EXPORT_MARKER).is_file():
        run_stage("align", data, align_random, "--run.init_from", "null")
    stage_s = time.perf_counter() - start
    print_alignment({"pretrain export": stage_root, "random init": align_random})
    init_from = {"random": "null", "pretrain": str(stage_root / "pretrain" / "export"),
                 "align": str(stage_root / "align" / "export")}

    print(f"SFT ablation: {args.sft_steps} SFT steps per run (stages/configs/sft/debug.yaml, tiny-arm encoder), "
          f"test split of {data}; pretrain+align {stage_s:.0f} s", flush=True)
    print(f"| SFT from | train studies | seed | test CE-F1 | CE-F1-13 | clue F1 | probe F1 "
          f"| bank label match@{LABEL_K} (random) |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    ce_f1: dict[tuple[float, str], list[float]] = {}
    for fraction in args.fractions:
        sft_data = data if fraction == 1.0 else subset(data, fraction, args.work / f"data_{fraction:g}")
        for init in args.inits:
            encoder, overrides, label = INITS[init]
            for seed in args.seeds:
                run_root = args.work / f"sft_{init}_{fraction:g}_s{seed}"
                cfg = run_stage("sft", sft_data, run_root, "--run.init_from", init_from[encoder],
                                "--model.vision", "tiny-arm", "--train.max_steps", str(args.sft_steps),
                                "--train.eval_every", "0", "--checkpoint.save_every", "0", "--run.seed", str(seed),
                                "--eval.max_new_tokens", str(args.max_new_tokens), *overrides)
                m = evaluate_export(run_root, cfg, args.max_new_tokens)
                ce_f1.setdefault((fraction, init), []).append(m["ce_f1"])
                # Rows print as they finish, so a long run shows its table as it goes.
                print(f"| {label} | {m['n_train']} ({fraction:.0%}) | {seed} | {m['ce_f1']:.3f} | {m['ce_f1_13']:.3f} "
                      f"| {m['clue_f1']:.3f} | {m['probe_f1']:.3f} | {m['bank']:.3f} ({m['bank_chance']:.3f}) |",
                      flush=True)
    if len(args.seeds) > 1:
        print_seed_means(ce_f1, args.seeds)
    print(f"total {time.perf_counter() - start:.0f} s")

if __name__ == "__main__":
    main()
