"""Score generated reports against references: NLG, clinical-efficacy and model-based metrics.

    python -m rewards.evaluate --pred preds.jsonl --ref refs.jsonl \
        --metrics bleu,rouge_l,cider,meteor,ce,radcliq --out scores.json

Both files hold one ``{"id": ..., "report": ...}`` object per line and are matched by id. Metrics whose
weights (or Java, for METEOR) are absent are reported under ``skipped`` with the reason instead of failing.
Stages call :func:`evaluate_reports` directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rewards.clinical import UncertainPolicy, build_labeler, ce_metrics
from rewards.nlg import corpus_nlg_scores, java_available

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = (
    "bleu",
    "rouge_l",
    "cider",
    "meteor",
    "ce",
    "ce_chexbert",
    "bertscore",
    "chexbert_similarity",
    "radgraph",
    "radcliq",
)
DEFAULT_METRICS: tuple[str, ...] = ("bleu", "rouge_l", "cider", "meteor", "ce", "radcliq")


def read_reports(path: str | Path) -> dict[str, str]:
    """Reads a jsonl file of ``{"id", "report"}`` rows into id -> report.

    Raises:
        ValueError: A row lacks ``id``/``report``, is not JSON, or repeats an id (the message names file:line).
    """
    path = Path(path)
    reports: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
        if not isinstance(row, dict) or "id" not in row or "report" not in row:
            raise ValueError(f"{path}:{lineno}: each row needs 'id' and 'report' fields, got {line[:80]!r}")
        key = str(row["id"])
        if key in reports:
            raise ValueError(f"{path}:{lineno}: duplicate id {key!r}")
        reports[key] = str(row["report"])
    return reports


def align(preds: Mapping[str, str], refs: Mapping[str, str]) -> tuple[list[str], list[str], list[str]]:
    """Pairs predictions and references by id (reference order).

    Returns:
        ``(ids, hyps, refs)``.

    Raises:
        ValueError: Ids present on one side only; the message lists them.
    """
    missing = [k for k in refs if k not in preds]
    extra = [k for k in preds if k not in refs]
    if missing or extra:
        raise ValueError(
            f"prediction and reference ids differ: {len(missing)} reference ids have no prediction "
            f"{missing[:20]}{' ...' if len(missing) > 20 else ''}; {len(extra)} prediction ids have no "
            f"reference {extra[:20]}{' ...' if len(extra) > 20 else ''}"
        )
    ids = list(refs)
    return ids, [preds[k] for k in ids], [refs[k] for k in ids]


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def _model_metric(metric: str, hyps: list[str], refs: list[str], device: str) -> dict[str, float]:
    """Corpus means of a model-based metric; raises WeightsNotFoundError when its weights are absent."""
    from rewards.composite import build_reward

    if metric == "radcliq":
        out = build_reward("radcliq_v1", device=device).score(hyps, refs)
        means = {f"radcliq_v1/{k}": _mean(v) for k, v in out.sub_scores.items() if k != "radcliq"}
        return {"radcliq_v1": _mean(out.sub_scores["radcliq"]), **means}
    return {metric: _mean(build_reward(metric, device=device).score(hyps, refs).scores)}


def evaluate_reports(
    preds: Mapping[str, str] | Sequence[str],
    refs: Mapping[str, str] | Sequence[str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    uncertain_policy: UncertainPolicy = "negative",
    device: str = "cpu",
) -> dict[str, Any]:
    """Computes the requested metrics over a test set.

    Args:
        preds: Generated reports, id -> report, or a list aligned with ``refs``.
        refs: Reference reports in the same form.
        metrics: Names from :data:`METRICS`. ``ce`` uses the weight-free rule labeler, ``ce_chexbert`` CheXbert;
            ``radcliq`` is RadCliQ-v1 (lower is better) with its mean components.
        uncertain_policy: Whether uncertain CheXpert labels count as positive in CE metrics.
        device: Torch device for model-based metrics.

    Returns:
        ``{"n": int, "scores": {name: float}, "ce_per_observation": {labeler: table}, "skipped": {metric: reason}}``.
    """
    from rewards.weights import WeightsNotFoundError

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; valid: {', '.join(METRICS)}")
    if isinstance(preds, Mapping) != isinstance(refs, Mapping):
        raise TypeError("preds and refs must both be id -> report mappings or both be aligned lists")
    if isinstance(preds, Mapping):
        _, hyps, references = align(preds, refs)
    else:
        if len(preds) != len(refs):
            raise ValueError(f"got {len(preds)} predictions but {len(refs)} references")
        hyps, references = list(preds), list(refs)
    if not hyps:
        raise ValueError("no reports to evaluate")
    result: dict[str, Any] = {"n": len(hyps), "scores": {}, "ce_per_observation": {}, "skipped": {}}
    scores, skipped = result["scores"], result["skipped"]

    nlg = [m for m in ("bleu", "rouge_l", "cider", "meteor") if m in metrics]
    if "meteor" in nlg and not java_available():
        nlg.remove("meteor")
        skipped["meteor"] = "pycocoevalcap's METEOR needs `java` on PATH"
    if nlg:
        scores.update(corpus_nlg_scores(hyps, references, nlg))

    for metric, labeler_name in (("ce", "rule"), ("ce_chexbert", "chexbert")):
        if metric not in metrics:
            continue
        try:
            labeler = build_labeler(labeler_name, device=device)
        except (WeightsNotFoundError, ImportError) as err:
            skipped[metric] = str(err)
            continue
        ce = ce_metrics(labeler.label(hyps), labeler.label(references), uncertain_policy)
        scores.update({f"{metric}/{k}": v for k, v in ce.scores.items()})
        result["ce_per_observation"][labeler_name] = ce.per_observation

    for metric in ("bertscore", "chexbert_similarity", "radgraph", "radcliq"):
        if metric not in metrics:
            continue
        try:
            scores.update(_model_metric(metric, hyps, references, device))
        except (WeightsNotFoundError, ImportError) as err:
            skipped[metric] = str(err)
    for metric, reason in skipped.items():
        logger.warning("metric %s skipped: %s", metric, reason.splitlines()[0])
    return result


def format_table(result: Mapping[str, Any]) -> str:
    """A two-column text table of the scores, then the skipped metrics."""
    scores = result["scores"]
    width = max([len(k) for k in scores] + [6])
    lines = [f"{'metric':<{width}}  value   (n={result['n']})"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in scores.items()]
    lines += [f"{k:<{width}}  skipped: {reason.splitlines()[0]}" for k, reason in result["skipped"].items()]
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m rewards.evaluate``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", required=True, help="jsonl of {'id', 'report'} generated reports")
    parser.add_argument("--ref", required=True, help="jsonl of {'id', 'report'} reference reports")
    parser.add_argument(
        "--metrics", default=",".join(DEFAULT_METRICS), help=f"comma-separated subset of {','.join(METRICS)}"
    )
    parser.add_argument("--out", default=None, help="write the full result as JSON here")
    parser.add_argument("--uncertain-policy", choices=("negative", "positive"), default="negative")
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the CLI; returns the result dict."""
    args = make_parser().parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    result = evaluate_reports(
        read_reports(args.pred), read_reports(args.ref), metrics, args.uncertain_policy, args.device
    )
    sys.stdout.write(format_table(result) + "\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
