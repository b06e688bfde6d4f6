"""Score generated reports against references: NLG, clinical-efficacy and model-based metrics.

    python -m rewards.evaluate --pred preds.jsonl --ref refs.jsonl --dataset mimic_cxr \
        --metrics bleu,rouge_l,cider,meteor,ce,radcliq --out scores.json

Both files hold one ``{"id": ..., "report": "..."}`` object per line and are matched by id. References are
cleaned and truncated the way ``evaluate_run`` (and R2Gen) prepares them for the dataset (``--no-truncate``
keeps them whole); NLG tokens use the dataset's R2Gen cleaner. CE metric names say the labeler and the uncertain
policy: ``ce`` / ``ce_chexbert`` count uncertain as negative (R2Gen), ``*_unc_pos`` as positive (f1chexbert).
Metrics whose weights (or Java, for METEOR) are absent are reported under ``skipped`` with the reason instead of
failing. Input errors end the CLI with one line naming the file and line. Stages call :func:`evaluate_reports`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from rewards.cleaning import CLEANERS, DEFAULT_CLEANER, DEFAULT_MAX_WORDS, truncate_words
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
CE_LABELERS = {"ce": "rule", "ce_chexbert": "chexbert"}
# Score-name suffix and description of each uncertain policy.
CE_POLICIES: dict[str, tuple[str, str]] = {
    "negative": ("", "uncertain counted as negative (R2Gen)"),
    "positive": ("_unc_pos", "uncertain counted as positive (f1chexbert)"),
}


def read_reports(path: str | Path) -> dict[str, str]:
    """Reads a jsonl file of ``{"id", "report"}`` rows into id -> report.

    Raises:
        ValueError: The file is missing or unreadable, or a line is not UTF-8 or JSON, lacks ``id``/``report``, has a
            report that is not a string (``null``), or repeats an id; the message names file:line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or err})") from err
    reports: dict[str, str] = {}
    for lineno, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {err.start} of the line)") from err
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(row, dict) or "id" not in row or "report" not in row:
            raise ValueError(f"{path}:{lineno}: each row needs 'id' and 'report' fields, got {line[:80]!r}")
        if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            raise ValueError(f"{path}:{lineno}: 'id' must be a string or integer, got {json.dumps(row['id'])}")
        if not isinstance(row["report"], str):
            raise ValueError(f"{path}:{lineno}: 'report' must be a string, got {json.dumps(row['report'])[:40]}")
        key = str(row["id"])
        if key in reports:
            raise ValueError(f"{path}:{lineno}: duplicate id {key!r}")
        reports[key] = row["report"]
    return reports


def prepare_references(refs: Mapping[str, str], dataset: str, truncate: bool = True) -> dict[str, str]:
    """References as ``evaluate_run`` scores them: the dataset's R2Gen cleaner, then its word cut.

    Args:
        refs: id -> raw reference report.
        dataset: A key of ``rewards.cleaning.DEFAULT_CLEANER`` (``iu_xray``, ``mimic_cxr``, ...).
        truncate: False keeps the references as given.

    Returns:
        id -> reference.
    """
    if dataset not in DEFAULT_CLEANER:
        raise ValueError(f"dataset must be one of {sorted(DEFAULT_CLEANER)}, got {dataset!r}")
    if not truncate:
        return dict(refs)
    clean, max_words = CLEANERS[DEFAULT_CLEANER[dataset]], DEFAULT_MAX_WORDS[dataset]
    return {k: truncate_words(clean(v), max_words) for k, v in refs.items()}


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
    uncertain_policy: UncertainPolicy | Literal["both"] = "negative",
    device: str = "cpu",
    cleaner: str = "mimic_cxr",
) -> dict[str, Any]:
    """Computes the requested metrics over a test set.

    Args:
        preds: Generated reports, id -> report, or a list aligned with ``refs``.
        refs: Reference reports in the same form.
        metrics: Names from :data:`METRICS`. ``ce`` uses the weight-free rule labeler, ``ce_chexbert`` CheXbert;
            ``radcliq`` is RadCliQ-v1 (lower is better) with its mean components.
        uncertain_policy: Whether uncertain CheXpert labels count as negative (R2Gen; scores ``ce/...``) or
            positive (f1chexbert; scores ``ce_unc_pos/...``) in CE metrics, or ``"both"``.
        device: Torch device for model-based metrics.
        cleaner: R2Gen cleaner for the NLG tokens (``"iu_xray"`` for IU-Xray, ``"mimic_cxr"`` otherwise).

    Returns:
        ``{"n": int, "scores": {name: float}, "ce_protocol": {ce name: "labeler, policy"},
        "ce_per_observation": {ce name: table}, "skipped": {metric: reason}}``.
    """
    from rewards.weights import WeightsNotFoundError

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; valid: {', '.join(METRICS)}")
    policies = list(CE_POLICIES) if uncertain_policy == "both" else [uncertain_policy]
    if any(p not in CE_POLICIES for p in policies):
        raise ValueError(f"uncertain_policy must be 'negative', 'positive' or 'both', got {uncertain_policy!r}")
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
    result: dict[str, Any] = {
        "n": len(hyps), "scores": {}, "ce_protocol": {}, "ce_per_observation": {}, "skipped": {}
    }
    scores, skipped = result["scores"], result["skipped"]

    nlg = [m for m in ("bleu", "rouge_l", "cider", "meteor") if m in metrics]
    if "meteor" in nlg and not java_available():
        nlg.remove("meteor")
        skipped["meteor"] = "pycocoevalcap's METEOR needs `java` on PATH"
    if nlg:
        scores.update(corpus_nlg_scores(hyps, references, nlg, cleaner))

    for metric, labeler_name in CE_LABELERS.items():
        if metric not in metrics:
            continue
        try:
            labeler = build_labeler(labeler_name, device=device)
        except (WeightsNotFoundError, ImportError) as err:
            skipped[metric] = str(err)
            continue
        hyp_labels, ref_labels = labeler.label(hyps), labeler.label(references)
        for policy in policies:
            suffix, description = CE_POLICIES[policy]
            ce = ce_metrics(hyp_labels, ref_labels, policy)
            scores.update({f"{metric}{suffix}/{k}": v for k, v in ce.scores.items()})
            result["ce_protocol"][metric + suffix] = f"{labeler_name} labeler, {description}"
            result["ce_per_observation"][metric + suffix] = ce.per_observation

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
    """A two-column text table of the scores, then how each CE column was computed, then the skipped metrics."""
    scores = result["scores"]
    width = max([len(k) for k in scores] + [6])
    lines = [f"{'metric':<{width}}  value   (n={result['n']})"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in scores.items()]
    lines += [f"{k:<{width}}  = {protocol}" for k, protocol in result.get("ce_protocol", {}).items()]
    lines += [f"{k:<{width}}  skipped: {reason.splitlines()[0]}" for k, reason in result["skipped"].items()]
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m rewards.evaluate``."""
    parser = argparse.ArgumentParser(
        prog="rewards.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pred", required=True, help="jsonl of {'id', 'report'} generated reports")
    parser.add_argument("--ref", required=True, help="jsonl of {'id', 'report'} reference reports")
    parser.add_argument(
        "--metrics", default=",".join(DEFAULT_METRICS), help=f"comma-separated subset of {','.join(METRICS)}"
    )
    parser.add_argument("--out", default=None, help="write the full result as JSON here")
    parser.add_argument(
        "--uncertain-policy",
        choices=("negative", "positive", "both"),
        default="negative",
        help="CE: uncertain as negative (R2Gen), as positive (f1chexbert), or both",
    )
    parser.add_argument(
        "--dataset",
        choices=sorted(DEFAULT_CLEANER),
        default="mimic_cxr",
        help="selects the R2Gen cleaner and the reference word cut (as evaluate_run)",
    )
    parser.add_argument("--no-truncate", action="store_true", help="score the references whole (no word cut)")
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the CLI; returns the result dict. Input errors exit with status 2 and one line on stderr."""
    parser = make_parser()
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        refs = prepare_references(read_reports(args.ref), args.dataset, truncate=not args.no_truncate)
        result = evaluate_reports(
            read_reports(args.pred),
            refs,
            metrics,
            args.uncertain_policy,
            args.device,
            cleaner=DEFAULT_CLEANER[args.dataset],
        )
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(err).split())}\n")
    sys.stdout.write(format_table(result) + "\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
