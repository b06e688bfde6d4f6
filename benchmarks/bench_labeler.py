"""CheXpert labeler throughput (reports/s) on fresh reports, as in RL where every rollout is new text.

    python benchmarks/bench_labeler.py                 # rule labeler; CheXbert too when its weights resolve
    python benchmarks/bench_labeler.py --threads 4 --seconds 10

Reports are 3-6 sentences drawn from the labeler's hand-labelled evaluation set
(``tests/rewards/data/labeler_eval.jsonl``); each timed call labels a batch the labeler has not seen (its cache is
new), so the numbers are uncached throughput. Torch threads are pinned and printed: CheXbert depends on them, the
rule labeler does not.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from rewards.clinical import build_labeler
from rewards.weights import WeightsNotFoundError

EVAL_SET = Path(__file__).resolve().parents[1] / "tests" / "rewards" / "data" / "labeler_eval.jsonl"


def make_reports(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct reports of 3-6 evaluation-set sentences."""
    sentences = [json.loads(line)["text"] for line in EVAL_SET.read_text(encoding="utf-8").splitlines() if line]
    rng = random.Random(seed)
    reports: dict[str, None] = {}
    while len(reports) < n:
        reports[" ".join(rng.sample(sentences, rng.randint(3, 6)))] = None
    return list(reports)


def reports_per_second(name: str, reports: list[str], batch: int, seconds: float, device: str) -> float:
    """Uncached throughput: a fresh labeler (empty cache) for each pass over ``reports``."""
    labeled, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        labeler = build_labeler(name, device=device)
        for i in range(0, len(reports), batch):
            labeler.label(reports[i : i + batch])
            labeled += len(reports[i : i + batch])
    return labeled / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (pinned)")
    parser.add_argument("--reports", type=int, default=512, help="distinct reports per pass")
    parser.add_argument("--batch", type=int, default=64, help="reports per label() call")
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds per labeler")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reports = make_reports(args.reports)
    words = sum(len(r.split()) for r in reports) / len(reports)
    print(f"torch threads {torch.get_num_threads()}, {len(reports)} reports of {words:.0f} words on average")
    rule = reports_per_second("rule", reports, args.batch, args.seconds, args.device)
    print(f"rule labeler: {rule:.1f} reports/s")
    try:
        build_labeler("chexbert", device=args.device)
    except (WeightsNotFoundError, ImportError) as err:
        print(f"chexbert: skipped ({str(err).splitlines()[0]})")
        return
    chexbert = reports_per_second("chexbert", reports, args.batch, args.seconds, args.device)
    print(f"chexbert: {chexbert:.1f} reports/s; rule / chexbert = {rule / chexbert:.1f}x")


if __name__ == "__main__":
    main()
