"""Does the pipeline learn radiologists' prose? The whole pipeline on real reports with rendered images, per seed.

    python benchmarks/bench_realtext.py --reports-from iu_xray/annotation.json --data rt --out rt_runs --seeds 0 1 2
    python benchmarks/bench_realtext.py --data rt --out rt_runs --seeds 0            # a set built before
    python benchmarks/bench_realtext.py --data rt --out rt_runs --seeds 0 --stages sft,ppo   # reuse earlier exports

``--reports-from`` first builds ``--data`` with ``python -m rlhf_rrg.data.realtext`` (each study's real report,
id and split, CheXpert labels from the dataset or the rule labeler, one 64 px frontal image drawn with the findings
the report states; a fixed 200-study sample of test). Then, for each seed, the four stages run as a user runs them
(``accelerate launch stages/<stage>.py --config stages/configs/<stage>/realtext.yaml``) in one run root
``<out>/seed_<s>``, a stage whose export is complete being kept (``--redo`` reruns), and its scores too
(``eval/realtext.json``), so seeds run as parallel invocations are summarised by one more. Every choice in those
configs was made on val; the test split is only scored here. Per seed it prints ``evaluate_run``'s test table
(``eval/table.md``, ``eval/<stage>/predictions.jsonl``) and what the SFT export sees next to what SFT and RL write:
per-observation F1 of a linear probe on its frozen features (fit on train, thresholds from val), its clue head, and
the greedy reports (rule labeler, positives only). Then every number as mean and minimum over the seeds, and the
targets of issue 21 checked per seed:

- SFT reports state what the model sees: CE-F1 over the 13 pathologies >= 0.6 x the probe's; Cardiomegaly F1 >= 0.6;
- RL adds >= 0.05 pathology CE-F1 over SFT, with BLEU-4 >= 0.95 x SFT's, length 0.85-1.15 x the references' and no
  more reports repeating a sentence than SFT;
- align: val i2t label-match@5 >= 1.5 x random retrieval's (at the evaluation the export was selected by, so
  optimistic; the table also gives the export's test-split retrieval, which nothing was chosen on).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import machine_line, pin_threads
from torch.utils.data import DataLoader

from rlhf_rrg.config import load_config
from rlhf_rrg.data.collate import ReportTextCollator
from rlhf_rrg.data.dataset import build_dataset, labels_tensor
from rlhf_rrg.data.realtext import RealTextConfig, write_realtext_dataset
from rlhf_rrg.evaluate_run import evaluate_run, resolve_data_config
from rlhf_rrg.evaluation import EvalConfig
from rlhf_rrg.export.aligner import load_aligner
from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.probe import probe_export
from rlhf_rrg.prompting.generator import ReportGenerator
from rlhf_rrg.retrieval.alignment_eval import embed_pairs
from rlhf_rrg.retrieval.metrics import finding_precision_at_k, label_match_hits, ratio_interval
from rlhf_rrg.rl.monitors import text_statistics
from rlhf_rrg.runroot import EXPORT_MARKER, StageDirs
from rlhf_rrg.testing.stage_scripts import stage_config_class

REPO = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "align", "sft", "ppo")
TEST_STUDIES = 200


def run_stages(run_root: Path, data: Path, seed: int, stages: list[str], redo: bool, threads: int) -> dict[str, float]:
    """Runs each stage as a user does (printing its wall time); returns the seconds (0 for an export kept)."""
    walls = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    for stage in stages:
        if (StageDirs(run_root, stage).export / EXPORT_MARKER).is_file() and not redo:
            walls[stage] = 0.0
            continue
        config = REPO / "stages" / "configs" / stage / "realtext.yaml"
        command = ["accelerate", "launch", "--config_file", str(REPO / "accelerate_configs/cpu_debug.yaml"),
                   str(REPO / "stages" / f"{stage}.py"), "--config", str(config),
                   "--data.annotation_path", str(data / "annotation.json"), "--data.image_root", str(data / "images"),
                   "--run.run_root", str(run_root), "--run.seed", str(seed), "--run.overwrite", "true"]
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        walls[stage] = time.perf_counter() - start
        print(f"seed {seed}: {stage} in {walls[stage]:.0f} s", flush=True)
    return walls


def align_retrieval(run_root: Path) -> tuple[dict[str, float], str]:
    """Val retrieval of the evaluation the align export was chosen at (first best of its select metric, so
    optimistic), and the export's retrieval on the test split, which nothing was chosen on: exact-set label match
    and, per finding, how often the reports retrieved for an image state it (:func:`finding_precision_at_k`). Each
    ratio to chance comes with its 95% bootstrap interval over the split's images (:func:`ratio_interval`), from
    the export's retrieval on the split. Returns the scores and the per-finding table."""
    dirs = StageDirs(run_root, "align")
    cfg = load_config(stage_config_class("align"), dirs.config, [])
    rows = [r for r in read_jsonl(dirs.metrics) if f"eval/{cfg.train.select_metric}" in r]
    best = max(rows, key=lambda r: r[f"eval/{cfg.train.select_metric}"])  # max keeps the first of equal values
    match, chance = best["eval/i2t_label_match@5"], best["eval/i2t_label_match@5_chance"]
    model, tokenizer = load_aligner(dirs.export)

    def retrieve(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(image -> report similarities, label codes) over the split, in one order."""
        studies = build_dataset(cfg.data, split, train=False)
        loader = DataLoader(studies, batch_size=cfg.eval.batch_size,
                            collate_fn=ReportTextCollator(tokenizer, cfg.text.max_length))
        with torch.no_grad():
            image_emb, text_emb, order = embed_pairs(model.eval(), loader)
        return image_emb @ text_emb.T, torch.stack([labels_tensor(studies.studies[int(i)].labels) for i in order])

    def hits_and_interval(
        sims: torch.Tensor, labels: torch.Tensor, name: str,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Per-query label-match hits and chance (:func:`label_match_hits`), and the ratio's 95% interval."""
        hits, per_query_chance = label_match_hits(sims, labels, labels, 5)
        low, high = ratio_interval(hits.float().mean(1), per_query_chance)
        return hits, per_query_chance, {f"{name} ratio 95% low": low, f"{name} ratio 95% high": high}

    *_, val_interval = hits_and_interval(*retrieve("val"), "align")
    sims, labels = retrieve("test")
    hits, per_query_chance, test_interval = hits_and_interval(sims, labels, "align test")
    test_match, test_chance = hits.float().mean().item(), per_query_chance.mean().item()  # label_match_at_k's
    row = {"align label-match@5": match, "align chance": chance, "align ratio": match / chance, **val_interval,
           "align test label-match@5": test_match, "align test chance": test_chance,
           "align test ratio": test_match / test_chance, **test_interval}
    found = finding_precision_at_k(sims, labels, labels, 5)
    # Pathologies with at least 3 positive test studies: fewer make a share of 0, 1/5 or 2/5 by luck.
    scored = [n for n, v in found.items() if n != "No Finding" and v["queries"] >= 3]
    for key in ("with", "without", "base"):
        row[f"align test finding P@5 {key}"] = statistics.fmean(found[n][key] for n in scored)
    table = ["| finding (test) | studies | retrieved stating it: image has it | image lacks it | all reports |",
             "|---|---|---|---|---|"]
    table += [f"| {n} | {v['queries']} | {v['with']:.2f} | {v['without']:.2f} | {v['base']:.2f} |"
              for n, v in found.items()]
    return row, "\n".join(table)


def seed_results(run_root: Path) -> tuple[dict[str, float], str]:
    """Scores of one seed's run root (test split) and its sees-vs-writes table."""
    results = evaluate_run(run_root, "test")
    data = resolve_data_config(run_root, [])
    references = [r["reference"] for r in read_jsonl(run_root / "eval" / "sft" / "predictions.jsonl")]
    written = {stage: [r["prediction"] for r in read_jsonl(run_root / "eval" / stage / "predictions.jsonl")]
               for stage in ("sft", "ppo")}
    generator = ReportGenerator.from_export(StageDirs(run_root, "sft").export)
    splits = [build_dataset(data, split, train=False) for split in ("train", "val", "test")]
    report, _, _ = probe_export(generator, *splits, EvalConfig(split="test", max_new_tokens=100),
                                other_reports={"rl reports": written["ppo"]})
    row = {}
    for source, name in (("probe", "probe"), ("clue head", "clue"), ("reports", "sft"), ("rl reports", "ppo")):
        row[f"{name} F1-13"] = report.micro[source]["f1_13"]
        row[f"{name} Cardiomegaly F1"] = report.rows["Cardiomegaly"][source]
    for stage in ("majority", "sft", "ppo"):
        scores = results[stage]["scores"]
        row |= {f"{stage} CE-F1-14": scores["ce/micro_f1_14"], f"{stage} CE-F1-13": scores["ce/micro_f1_13"],
                f"{stage} CE-mF1": scores["ce/macro_f1_14"], f"{stage} B4": scores["bleu_4"]}
    for stage in ("sft", "ppo"):
        stats = text_statistics(written[stage], references)
        row[f"{stage} length ratio"] = stats["length_ratio"]
        row[f"{stage} repeat rate"] = stats["repeated_sentence_rate"]
    return row, report.table()


TARGETS: dict[str, Callable[[dict[str, float]], bool]] = {
    "sft F1-13 >= 0.6 x probe": lambda r: r["sft F1-13"] >= 0.6 * r["probe F1-13"],
    "sft Cardiomegaly F1 >= 0.6": lambda r: r["sft Cardiomegaly F1"] >= 0.6,
    "rl F1-13 >= sft + 0.05": lambda r: r["ppo CE-F1-13"] >= r["sft CE-F1-13"] + 0.05,
    "rl B4 >= 0.95 x sft": lambda r: r["ppo B4"] >= 0.95 * r["sft B4"],
    "rl length 0.85-1.15": lambda r: 0.85 <= r["ppo length ratio"] <= 1.15,
    "rl repeats <= sft": lambda r: r["ppo repeat rate"] <= r["sft repeat rate"],
    "align label-match >= 1.5 x chance": lambda r: r["align ratio"] >= 1.5,
}


def summary(rows: dict[int, dict[str, float]]) -> str:
    """Every number as mean, minimum and maximum over seeds, then each target per seed."""
    seeds = sorted(rows)
    lines = [f"over seeds {seeds}:", "| metric | mean | min | max | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---" * (4 + len(seeds)) + "|"]
    for key in rows[seeds[0]]:
        values = [rows[s][key] for s in seeds]
        cells = [statistics.fmean(values), min(values), max(values), *values]
        lines.append(f"| {key} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    lines += ["", "| target | " + " | ".join(f"seed {s}" for s in seeds) + " | seeds met |",
              "|---" * (2 + len(seeds)) + "|"]
    for name, check in TARGETS.items():
        met = [check(rows[s]) for s in seeds]
        lines.append(f"| {name} | " + " | ".join("yes" if m else "no" for m in met) + f" | {sum(met)}/{len(seeds)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the real-text set (built here with --reports-from)")
    parser.add_argument("--out", type=Path, required=True, help="one run root per seed: <out>/seed_<s>")
    parser.add_argument("--reports-from", type=Path, default=None,
                        help="R2Gen annotation.json or CheXpert Plus CSV to build --data from first")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stages", default=",".join(STAGES), help="stages (re)run when their export is missing")
    parser.add_argument("--redo", action="store_true", help="rerun the stages even where an export exists")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in every stage run")
    args = parser.parse_args()
    pin_threads(args.threads)
    print(machine_line(), flush=True)
    if args.reports_from is not None:
        write_realtext_dataset(args.data, RealTextConfig(reports_from=args.reports_from, n_test=TEST_STUDIES))
    if not (args.data / "annotation.json").is_file():
        sys.exit(f"bench_realtext: {args.data / 'annotation.json'} is missing; pass --reports-from to build it")
    stages = [s for s in args.stages.split(",") if s]
    rows: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        run_root = args.out / f"seed_{seed}"
        walls = run_stages(run_root, args.data, seed, stages, args.redo, args.threads)
        missing = [s for s in STAGES if not (StageDirs(run_root, s).export / EXPORT_MARKER).is_file()]
        if missing:  # e.g. seeds whose stages run as separate invocations (--stages pretrain,align first)
            print(f"seed {seed}: no {', '.join(missing)} export in {run_root} yet: not scored", flush=True)
            continue
        saved = run_root / "eval" / "realtext.json"
        if saved.is_file() and not any(walls.values()):
            # Scored before on these very exports (e.g. seeds run as parallel invocations): reuse, do not regenerate.
            rows[seed], seen = (json.loads(saved.read_text())[k] for k in ("row", "seen"))
        else:
            rows[seed], seen = seed_results(run_root)
            saved.write_text(json.dumps({"row": rows[seed], "seen": seen}, indent=2) + "\n", encoding="utf-8")
        aligned, per_finding = align_retrieval(run_root)
        rows[seed] = aligned | rows[seed] | aligned  # align keys first in the summary, values recomputed (seconds)
        print(f"\nseed {seed}: what the SFT export sees vs what SFT and RL write (test)\n{seen}\n", flush=True)
        print(f"seed {seed}: what the align export retrieves for each test image\n{per_finding}\n", flush=True)
    if not rows:
        return
    text = summary(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(text, encoding="utf-8")
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
