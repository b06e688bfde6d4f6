"""Does RL turn what the model sees into what it writes? Every RL algorithm from one SFT export, at an equal
budget of sampled reports, scored on the test split next to the export's probe ceiling.

    python benchmarks/bench_efficacy.py --run-root rrg_home/runs/demo            # after scripts/smoke_cpu.sh
    python benchmarks/bench_efficacy.py --run-root R --variants rloo,scst --budget 3840 --threads 1
    python benchmarks/bench_efficacy.py --run-root R0 R1 --seeds 0 1 2 --variants ppo   # 2 SFT exports x 3 RL seeds

For each variant (``VARIANTS``) the RL stage runs as a user runs it (``accelerate launch stages/ppo.py`` on the
stage config, ``--run.init_from <run-root>/sft/export``, a run root under ``--out``) with ``train.max_steps = budget /
(batch_size * num_samples)``; its export then generates greedy reports for the whole test split. The table gives
CE (CheXpert-14 micro, rule labeler, positives only) P/R/F1, micro F1 over the 13 pathologies (No Finding out) and
macro F1 over the 14, BLEU-4, ROUGE-L, mean length / reference length,
distinct-2, the share of reports repeating a sentence, the mean training reward of the greedy test reports, and the
stage's wall time. Above them: the linear probe on the SFT export's frozen pooled vision features (fit on train,
per-observation thresholds from val), the SFT clue head, and the SFT reports; "gap closed" is
``(F1_rl - F1_sft) / (F1_probe - F1_sft)``. Threads are pinned (``--threads``) and printed with the load average.

Every variant runs once per RL seed (``--seeds``, default 0 1 2) from each SFT export (``--run-root`` takes several,
e.g. SFT runs of different seeds); a last table gives each variant's gain over its own SFT export as mean (min to
max) over all its runs and on how many runs each per-seed target holds (gain >= 0.04, BLEU-4 >= 0.95x SFT's, length
0.85-1.15x the references', repetition <= SFT's). RL exports are chosen on val (``select``); test is read only here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlhf_rrg.config import load_config
from rlhf_rrg.data.dataset import DataConfig, build_dataset
from rlhf_rrg.evaluate_run import resolve_data_config
from rlhf_rrg.evaluation import EvalConfig, generate_and_score, with_context
from rlhf_rrg.probe import probe_export
from rlhf_rrg.prompting.generator import ReportGenerator
from rlhf_rrg.rl.scoring import build_stage_reward, empty_report_reward, heldout_report_metrics
from rlhf_rrg.testing.stage_scripts import stage_config_class

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("CE-F1", "CE-P", "CE-R", "CE-F1-13", "CE-mF1", "B4", "R-L", "len", "dist-2", "rep", "reward", "steps",
           "wall s")
# Runs the table compares: name -> stage overrides on top of the config (the demo's PPO on the LLM with the
# sentence-level clinical credit). "ppo-report" is the same PPO on the report-level reward alone; "scst", "rloo" and
# "grpo" train the LLM at the demo's lr and temperature with their own baselines (one update per batch, the report's
# total sentence credit added to its reward). The "+clues" runs sample each report's clue sentence from the clue head
# and train the head by policy gradient (pg.train_clues), the LLM barely moving; PPO cannot sample clue statements
# (its ratio and value head are per token).
CLUES = ["--pg.train_clues", "true", "--optim.lr", "1e-6", "--generation.temperature", "1.0"]
VARIANTS: dict[str, list[str]] = {
    "ppo": ["--algo", "ppo"],
    "ppo-report": ["--algo", "ppo", "--sentence_credit.weight", "0"],
    "scst": ["--algo", "scst"],
    "rloo": ["--algo", "rloo"],
    "grpo": ["--algo", "grpo"],
    "scst+clues": ["--algo", "scst", *CLUES],
    "rloo+clues": ["--algo", "rloo", *CLUES],
    "grpo+clues": ["--algo", "grpo", *CLUES],
}


def row(scores: dict[str, float], rows: list[dict], reward, worst: float) -> dict[str, float]:
    """The table's cells for one export's greedy test reports (the RL stage's own held-out metrics)."""
    extra = heldout_report_metrics(reward, [r["prediction"] for r in rows], [r["reference"] for r in rows], worst)
    return {"CE-F1": scores["ce/micro_f1_14"], "CE-P": scores["ce/micro_precision_14"],
            "CE-R": scores["ce/micro_recall_14"], "CE-F1-13": scores["ce/micro_f1_13"],
            "CE-mF1": scores["ce/macro_f1_14"], "B4": scores["bleu_4"], "R-L": scores["rouge_l"],
            "len": extra["length_ratio"], "dist-2": extra["distinct_2"], "rep": extra["repeated_sentence_rate"],
            "reward": extra["reward"]}


def format_row(name: str, values: dict[str, float]) -> str:
    cells = []
    for column in COLUMNS:
        value = values.get(column)
        cells.append("" if value is None else f"{value:.0f}" if column in ("steps", "wall s") else f"{value:.3f}")
    return f"| {name} | " + " | ".join(cells) + " |"


# Per-seed targets of an RL run against its SFT export (what "holds on every seed" counts).
TARGETS = {"gain >= 0.04": lambda rl, sft: rl["CE-F1"] >= sft["CE-F1"] + 0.04,
           "B4 >= 0.95x SFT": lambda rl, sft: rl["B4"] >= 0.95 * sft["B4"],
           "len 0.85-1.15": lambda rl, sft: 0.85 <= rl["len"] <= 1.15,
           "rep <= SFT": lambda rl, sft: rl["rep"] <= sft["rep"]}


def spread(values: list[float], sign: str = "+") -> str:
    """``mean (min to max)`` of one cell over runs; ``sign="+"`` prints signs, for differences."""
    return f"{sum(values) / len(values):{sign}.3f} ({min(values):{sign}.3f} to {max(values):{sign}.3f})"


def summary(runs: dict[str, list[dict]]) -> str:
    """One line per variant over all its (SFT export, RL seed) runs: the CE-F1 gain, BLEU-4 ratio, length ratio and
    gap closed as mean (min to max), and on how many runs each per-seed target holds."""
    lines = ["| variant | runs | CE-F1 gain | B4 / SFT | len | gap closed | " + " | ".join(TARGETS) + " |",
             "|---" * (6 + len(TARGETS)) + "|"]
    for name, items in runs.items():
        gains = [r["rl"]["CE-F1"] - r["sft"]["CE-F1"] for r in items]
        ratios = [r["rl"]["B4"] / r["sft"]["B4"] - 1 for r in items if r["sft"]["B4"] > 0]
        gaps = [r["gap"] for r in items if r["gap"] is not None]
        held = [f"{sum(check(r['rl'], r['sft']) for r in items)}/{len(items)}" for check in TARGETS.values()]
        lines.append(f"| {name} | {len(items)} | {spread(gains)} | {spread(ratios) if ratios else ''} | "
                     f"{spread([r['rl']['len'] for r in items], '')} | {spread(gaps) if gaps else ''} | "
                     + " | ".join(held) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", type=Path, nargs="+", required=True,
                        help="run roots with sft/export (and its config), e.g. SFT runs of different seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL seeds (run.seed) per SFT export")
    parser.add_argument("--config", type=Path, default=REPO / "stages/configs/ppo/debug.yaml")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {list(VARIANTS)}")
    parser.add_argument("--budget", type=int, default=0,
                        help="sampled reports per algorithm; 0: the config's max_steps * batch_size * num_samples")
    parser.add_argument("--out", type=Path, default=None,
                        help="run roots and results (default <first run-root>/efficacy)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in every stage run")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    args, extra = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    out = args.out or args.run_root[0] / "efficacy"
    out.mkdir(parents=True, exist_ok=True)
    variants = [a for a in args.variants.split(",") if a]
    tables, runs, records = [], {name: [] for name in variants}, []
    for sft_index, sft_root in enumerate(args.run_root):
        data: DataConfig = resolve_data_config(sft_root, [])
        data_args = ["--data.annotation_path", str(data.annotation_path), "--data.image_root", str(data.image_root)]
        cfg = load_config(stage_config_class("ppo"), args.config, [*data_args, *extra])
        per_step = cfg.train.batch_size * cfg.generation.num_samples
        steps = max(1, (args.budget or cfg.train.max_steps * per_step) // per_step)
        reward = build_stage_reward(cfg.reward.funcs, cfg.reward.weights)
        worst = empty_report_reward(reward, cfg.reward.empty_reward)
        eval_cfg = EvalConfig(split="test", batch_size=16, max_new_tokens=args.max_new_tokens)
        print(f"{sft_root}: threads {args.threads}, load average {os.getloadavg()[0]:.1f}; budget {steps * per_step} "
              f"sampled reports per run ({steps} steps x {cfg.train.batch_size} studies x "
              f"{cfg.generation.num_samples}), RL seeds {args.seeds}", flush=True)

        # 1. the ceiling: probe, clue head and SFT reports on test
        sft_export = sft_root / "sft" / "export"
        sft = ReportGenerator.from_export(sft_export)
        test = build_dataset(data, "test", train=False)
        probe, sft_scores, sft_rows = probe_export(sft, build_dataset(data, "train", train=False),
                                                   build_dataset(data, "val", train=False), test, eval_cfg)
        results = {"sft": row(sft_scores, sft_rows, reward, worst)}
        ceiling, start_f1 = probe.micro["probe"]["f1"], results["sft"]["CE-F1"]

        # 2. each algorithm and seed at the same budget, run as a user runs it
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for algo in variants:
            for seed in args.seeds:
                run_root = out / f"sft{sft_index}" / f"{algo}_s{seed}"
                # The venv's launcher whether or not it is activated (accelerate may not be on PATH).
                command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file",
                           str(REPO / "accelerate_configs/cpu_debug.yaml"), str(REPO / "stages/ppo.py"), "--config",
                           str(args.config), *data_args, *VARIANTS[algo], "--run.run_root", str(run_root),
                           "--run.init_from", str(sft_export), "--run.seed", str(seed), "--train.max_steps",
                           str(steps), "--run.overwrite", "true", *extra]
                start = time.perf_counter()
                subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
                wall = time.perf_counter() - start
                policy = ReportGenerator.from_export(run_root / "ppo" / "export")
                scores, rows = generate_and_score(policy, with_context(policy, test, exclude_self=False), eval_cfg)
                name = f"{algo} seed {seed}"
                results[name] = {**row(scores, rows, reward, worst), "steps": steps, "wall s": wall}
                gap = (results[name]["CE-F1"] - start_f1) / (ceiling - start_f1) if ceiling > start_f1 else None
                runs[algo].append({"rl": results[name], "sft": results["sft"], "gap": gap})
                print(f"{sft_root} {name}: test CE-F1 {results[name]['CE-F1']:.3f} in {wall:.0f} s", flush=True)

        # 3. one table per SFT export
        lines = [f"{sft_root}:", "", f"| source | {' | '.join(COLUMNS)} |", "|---" * (len(COLUMNS) + 1) + "|"]
        for source, label in (("probe", "probe ceiling (frozen features)"), ("clue head", "sft clue head")):
            if source in probe.micro:
                micro = probe.micro[source]
                lines.append(format_row(label, {"CE-F1": micro["f1"], "CE-P": micro["precision"],
                                                "CE-R": micro["recall"], "CE-F1-13": micro["f1_13"],
                                                "CE-mF1": micro["macro_f1"]}))
        lines += [format_row(name, values) for name, values in results.items()]
        tables.append("\n".join(lines))
        records.append({"run_root": str(sft_root), "probe": probe.to_json(), "results": results})

    # 4. every variant over all its runs
    table = "\n\n".join(tables) + "\n\nover all runs (gain, B4 / SFT - 1, gap: RL minus its own SFT export):\n\n" + \
        summary(runs) + "\n"
    (out / "efficacy.md").write_text(table, encoding="utf-8")
    (out / "efficacy.json").write_text(json.dumps(records, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
