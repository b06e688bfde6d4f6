"""Evaluate every report-generator export of a run on one split, next to a majority-report baseline.

    python -m rlhf_rrg.evaluate_run --run-root runs/iu_xray --split test --num-beams 3 --max-new-tokens 60
    python -m rlhf_rrg.evaluate_run --run-root runs/demo --stages sft --data.annotation_path data/x/annotation.json

The data settings come from the ``data`` section of the run's sft (else ppo, align, pretrain) ``config.yaml``,
then ``--data.*`` overrides; the resolved section is saved as ``<run_root>/eval/data.yaml``. For each evaluated
stage (``majority`` = the most common training report written for every study) this writes
``<run_root>/eval/<stage>/{predictions.jsonl, scores.json}``, then the paper-style table to stdout and
``<run_root>/eval/table.md``. Metrics whose weights (or Java, for METEOR) are absent are shown as skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rewards.clinical import CheXpertF1Reward
from rewards.evaluate import evaluate_reports
from rewards.labeler import RuleLabeler
from rewards.nlg import BleuReward, RougeLReward
from rewards.observations import BLANK, CHEXPERT_14
from rlhf_rrg.config import ConfigError, load_config, save_config
from rlhf_rrg.data.annotation import DataError
from rlhf_rrg.data.dataset import DataConfig, ReportDataset, build_dataset
from rlhf_rrg.evaluation import most_common_report
from rlhf_rrg.generate import CheckpointError, StudyImages, generate_for_studies, load_generator, write_jsonl
from rlhf_rrg.marker import export_id
from rlhf_rrg.runroot import EXPORT_MARKER, STAGES, StageDirs

logger = logging.getLogger(__name__)

MAJORITY = "majority"
GENERATOR_STAGES: tuple[str, ...] = ("sft", "ppo")
EVAL_METRICS: tuple[str, ...] = ("bleu", "meteor", "rouge_l", "cider", "ce", "ce_chexbert", "radgraph", "radcliq")
# Paper column -> score key(s) in evaluate_reports' output; CE prefers CheXbert labels, else the rule labeler.
TABLE_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("B1", ("bleu_1",)),
    ("B2", ("bleu_2",)),
    ("B3", ("bleu_3",)),
    ("B4", ("bleu_4",)),
    ("MTR", ("meteor",)),
    ("R-L", ("rouge_l",)),
    ("CIDEr", ("cider",)),
    ("CE-P", ("ce_chexbert/micro_precision_14", "ce/micro_precision_14")),
    ("CE-R", ("ce_chexbert/micro_recall_14", "ce/micro_recall_14")),
    ("CE-F1", ("ce_chexbert/micro_f1_14", "ce/micro_f1_14")),
    # Next to R2Gen's micro-14: the 13 pathologies (No Finding out) and macro-14, which a normal-for-all writer fails.
    ("CE-F1-13", ("ce_chexbert/micro_f1_13", "ce/micro_f1_13")),
    ("CE-mF1", ("ce_chexbert/macro_f1_14", "ce/macro_f1_14")),
    ("RadGraph", ("radgraph",)),
    ("RadCliQ", ("radcliq_v1",)),
)


@dataclass
class EvalDataConfig:
    """Root of ``<run_root>/eval/data.yaml``: the data evaluated on."""

    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Dataset, paths and report cleaning."})


def data_config_source(run_root: Path) -> Path | None:
    """The first of the sft, ppo, align, pretrain ``config.yaml`` files that has a ``data`` section."""
    for stage in ("sft", "ppo", "align", "pretrain"):
        path = StageDirs(run_root, stage).config
        if path.is_file() and isinstance((yaml.safe_load(path.read_text()) or {}).get("data"), dict):
            return path
    return None


def resolve_data_config(run_root: Path, overrides: Sequence[str]) -> DataConfig:
    """The run's data section with ``--data.*`` overrides applied, saved to ``<run_root>/eval/data.yaml``.

    Raises:
        ConfigError: an override names an unknown key or has a bad value (the message names it).
    """
    out = run_root / "eval" / "data.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    source = data_config_source(run_root)
    if source is None:
        logger.warning("no stage config.yaml with a data section under %s: using defaults + overrides", run_root)
        cfg = load_config(EvalDataConfig, None, list(overrides))
    else:
        logger.info("data settings from %s", source)
        out.write_text(yaml.safe_dump({"data": yaml.safe_load(source.read_text())["data"]}, sort_keys=False))
        cfg = load_config(EvalDataConfig, out, list(overrides))
    save_config(cfg, out)
    return cfg.data


def majority_report(train: ReportDataset) -> str:
    """The most frequent cleaned training report (the first seen among equally frequent ones)."""
    return most_common_report(train.report(i) for i in range(len(train)))


def _label_dict(codes: Sequence[int]) -> dict[str, int]:
    return {obs: int(code) for obs, code in zip(CHEXPERT_14, codes, strict=True) if code != BLANK}


def per_report_rows(
    ids: Sequence[str], images: Sequence[Sequence[str]], references: Sequence[str], predictions: Sequence[str]
) -> list[dict[str, Any]]:
    """Prediction rows with per-report scores and CheXpert labels (rule labeler, non-blank observations only).

    Returns:
        Rows ``{"id", "images", "reference", "prediction", "scores": {"bleu4", "rouge_l", "chexpert_f1"},
        "ref_labels": {observation: code}, "pred_labels": {observation: code}}``.
    """
    scores = {
        "bleu4": BleuReward(4).score(predictions, references).scores,
        "rouge_l": RougeLReward().score(predictions, references).scores,
        "chexpert_f1": CheXpertF1Reward(labeler="rule").score(predictions, references).scores,
    }
    labeler = RuleLabeler()
    ref_labels, pred_labels = labeler.label(references).tolist(), labeler.label(predictions).tolist()
    return [
        {
            "id": ids[i],
            "images": list(images[i]),
            "reference": references[i],
            "prediction": predictions[i],
            "scores": {name: values[i] for name, values in scores.items()},
            "ref_labels": _label_dict(ref_labels[i]),
            "pred_labels": _label_dict(pred_labels[i]),
        }
        for i in range(len(ids))
    ]


def table_value(scores: Mapping[str, float], keys: Sequence[str]) -> float | None:
    """The first of ``keys`` present in ``scores``, or None."""
    return next((scores[k] for k in keys if k in scores), None)


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table (rows = stages, paper columns), then which CE labeler was used and what was skipped."""
    header = "| stage | " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    for stage, result in results.items():
        cells = [table_value(result["scores"], keys) for _, keys in TABLE_COLUMNS]
        lines.append(f"| {stage} | " + " | ".join("skip" if v is None else f"{v:.3f}" for v in cells) + " |")
    notes = []
    for stage, result in results.items():
        ce = "ce_chexbert" if "ce_chexbert/micro_f1_14" in result["scores"] else "ce"
        protocol = result.get("ce_protocol", {}).get(ce, f"{ce} labeler")
        notes.append(f"- {stage}: n={result['n']}, CE: {protocol} (CheXpert-14 micro)")
        notes += [f"  - skipped {m}: {reason.splitlines()[0]}" for m, reason in result["skipped"].items()]
    return "\n".join(lines + [""] + notes) + "\n"


def evaluate_stage(
    stage: str,
    predictions: Sequence[str],
    dataset: ReportDataset,
    out_dir: Path,
    extra: Mapping[str, Any],
    device: str,
    cleaner: str = "mimic_cxr",
) -> dict[str, Any]:
    """Scores one stage's predictions and writes ``out_dir/{predictions.jsonl, scores.json}``."""
    ids = [s.id for s in dataset.studies]
    references = [dataset.report(i) for i in range(len(dataset))]
    images = [[str(p) for p in s.image_paths[: dataset.views]] for s in dataset.studies]
    result = evaluate_reports(
        list(predictions), references, EVAL_METRICS, uncertain_policy="both", device=device, cleaner=cleaner
    )
    result = {"stage": stage, **extra, **result}
    write_jsonl(per_report_rows(ids, images, references, predictions), out_dir / "predictions.jsonl")
    (out_dir / "scores.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def evaluate_run(
    run_root: str | Path,
    split: str = "test",
    stages: Sequence[str] = GENERATOR_STAGES,
    data_overrides: Sequence[str] = (),
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int = 100,
    device: str = "cpu",
) -> dict[str, dict[str, Any]]:
    """Generates with and scores each existing export of ``stages``, plus the majority baseline.

    Args:
        run_root: the run root shared by the stages.
        split: the split evaluated.
        stages: generator stages to evaluate (``sft``/``ppo``); missing exports are skipped with a warning.
        data_overrides: ``--data.key value`` overrides of the run's data section.
        batch_size: studies per generation batch.
        num_beams: beam width.
        max_new_tokens: generation budget per report.
        device: torch device for generation and model-based metrics.

    Returns:
        Stage -> ``scores.json`` content, majority first.

    Raises:
        ValueError: an unknown stage, or an export whose view count differs from ``data.views``.
    """
    run_root = Path(run_root)
    unknown = [s for s in stages if s not in GENERATOR_STAGES]
    if unknown:
        raise ValueError(f"--stages: {unknown} are not report-generator stages; choose from {GENERATOR_STAGES}")
    data = resolve_data_config(run_root, data_overrides)
    test = build_dataset(data, split, train=False)
    eval_root = run_root / "eval"
    # Generator stages first: a mismatched export fails before any scoring time is spent.
    generated: dict[str, dict[str, Any]] = {}
    for stage in stages:
        export = StageDirs(run_root, stage).export
        if not (export / EXPORT_MARKER).is_file():
            logger.warning("stage %s: no complete export at %s (%s missing), skipped", stage, export, EXPORT_MARKER)
            continue
        generator = load_generator(export, device)
        if generator.views != data.views:
            raise ValueError(
                f"{export} takes {generator.views} views per study but data.views={data.views}; "
                f"pass --data.views {generator.views}"
            )
        studies = [StudyImages(s.id, tuple(s.image_paths[: data.views])) for s in test.studies]
        rows = generate_for_studies(generator, studies, batch_size, max_new_tokens, num_beams)
        # The id ties the scores to this export: a model card shows them only while the export is the same.
        extra = {"split": split, "export": str(export), "export_id": export_id(export), "num_beams": num_beams,
                 "max_new_tokens": max_new_tokens}
        generated[stage] = evaluate_stage(
            stage, [r["report"] for r in rows], test, eval_root / stage, extra, device, data.resolved_cleaner
        )
    majority = [majority_report(build_dataset(data, "train", train=False))] * len(test)
    results = {
        MAJORITY: evaluate_stage(
            MAJORITY, majority, test, eval_root / MAJORITY, {"split": split}, device, data.resolved_cleaner
        )
    }
    results.update(generated)
    table = format_table(results)
    (eval_root / "table.md").write_text(table, encoding="utf-8")
    sys.stdout.write(table)
    return results


def make_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m rlhf_rrg.evaluate_run`` (unknown ``--data.*`` go to the loader)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", required=True, help=f"run root with the {', '.join(STAGES)} stage folders")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--stages", default=",".join(GENERATOR_STAGES), help="comma-separated subset of sft,ppo")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Runs the CLI; bad configs, data or checkpoints exit with a message."""
    parser = make_parser()
    args, overrides = parser.parse_known_args(argv)
    bad = [a for a in overrides if a.startswith("--") and not a.startswith("--data.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (only --data.* config overrides are accepted)")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    try:
        return evaluate_run(
            args.run_root,
            args.split,
            stages,
            overrides,
            args.batch_size,
            args.num_beams,
            args.max_new_tokens,
            args.device,
        )
    except (ConfigError, DataError, CheckpointError, ValueError) as err:
        sys.exit(f"rlhf_rrg.evaluate_run: error: {err}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    main()
