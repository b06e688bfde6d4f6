"""One self-contained HTML page for a run's evaluation: studies side by side, findings diff, summary plots.

Reads what :mod:`rlhf_rrg.evaluate_run` wrote (``<run_root>/eval/<stage>/{predictions.jsonl, scores.json}``)
and the RL curve from ``<run_root>/ppo/metrics.jsonl``. Images are embedded as base64 PNG thumbnails and
plots as inline SVG, so the file opens anywhere without a server, JavaScript or network.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from rewards.observations import POSITIVE
from rlhf_rrg.evaluate_run import MAJORITY, TABLE_COLUMNS, table_value
from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.runroot import STAGES, StageDirs
from rlhf_rrg.viewer.plots import bar_panels, line_plot

logger = logging.getLogger(__name__)

REWARD_KEY = "reward/mean"  # what stages/ppo.py logs every RL step
BAR_COLUMNS: tuple[str, ...] = ("B4", "R-L", "CIDEr", "CE-F1", "RadGraph")
# Evaluated stage folders are shown in pipeline order; any other folder under eval/ follows, sorted.
STAGE_ORDER: tuple[str, ...] = (MAJORITY, *STAGES)


@dataclass
class RunEval:
    """What a run's ``eval/`` folder and PPO metrics hold.

    Attributes:
        stages: evaluated stages in display order.
        predictions: stage -> study id -> prediction row (see :func:`rlhf_rrg.evaluate_run.per_report_rows`).
        scores: stage -> ``scores.json`` content.
        reward_curve: ``(steps, rewards)`` of ``reward/mean`` from ``ppo/metrics.jsonl`` (empty when absent).
    """

    stages: list[str]
    predictions: dict[str, dict[str, dict[str, Any]]]
    scores: dict[str, dict[str, Any]]
    reward_curve: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))


def _read_scores(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_run_eval(run_root: str | Path) -> RunEval:
    """Reads every ``eval/<stage>/`` with a ``predictions.jsonl`` and the PPO reward curve.

    Raises:
        FileNotFoundError: no evaluated stage under ``<run_root>/eval`` (run rlhf_rrg.evaluate_run first).
    """
    run_root = Path(run_root)
    eval_root = run_root / "eval"
    found = sorted(p.parent.name for p in eval_root.glob("*/predictions.jsonl"))
    if not found:
        raise FileNotFoundError(
            f"{eval_root} has no <stage>/predictions.jsonl: run `python -m rlhf_rrg.evaluate_run --run-root "
            f"{run_root}` first"
        )
    stages = [s for s in STAGE_ORDER if s in found] + [s for s in found if s not in STAGE_ORDER]
    predictions = {s: {r["id"]: r for r in read_jsonl(eval_root / s / "predictions.jsonl")} for s in stages}
    scores = {s: _read_scores(eval_root / s / "scores.json") for s in stages}
    steps: list[float] = []
    rewards: list[float] = []
    metrics = StageDirs(run_root, "ppo").metrics
    if metrics.is_file():
        for row in read_jsonl(metrics):
            if REWARD_KEY in row:
                steps.append(float(row["step"]))
                rewards.append(float(row[REWARD_KEY]))
    return RunEval(stages, predictions, scores, (steps, rewards))


def finding_diff(ref_labels: Mapping[str, int], pred_labels: Mapping[str, int]) -> tuple[list[str], list[str]]:
    """CheXpert findings missed and hallucinated by a prediction (positive = code 1, as in CE metrics).

    Returns:
        ``(missed, hallucinated)``: positive in the reference only, and positive in the prediction only.
    """
    ref = {obs for obs, code in ref_labels.items() if code == POSITIVE}
    pred = {obs for obs, code in pred_labels.items() if code == POSITIVE}
    return sorted(ref - pred), sorted(pred - ref)


def thumbnail_uri(path: str | Path, size: int) -> str | None:
    """A ``data:image/png;base64,...`` thumbnail no larger than ``size`` px, or None if unreadable."""
    try:
        with Image.open(path) as img:
            img.load()
            thumb = img.convert("L")
    except (OSError, UnidentifiedImageError) as err:
        logger.warning("viewer: cannot read image %s (%s)", path, err)
        return None
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _chips(findings: Sequence[str], kind: str) -> str:
    return "".join(f'<span class="finding {kind}">{escape(f)}</span>' for f in findings)


def _images_html(paths: Sequence[str], thumb_size: int) -> str:
    cells = []
    for path in paths:
        uri = thumbnail_uri(path, thumb_size)
        if uri is None:
            cells.append(f'<div class="thumb missing">image not readable: {escape(path)}</div>')
        else:
            cells.append(f'<img class="thumb" src="{uri}" alt="{escape(path)}" title="{escape(path)}">')
    return "".join(cells)


def _report_column(stage: str, row: Mapping[str, Any] | None, reference_labels: Mapping[str, int]) -> str:
    if row is None:
        return (
            f'<div class="report generated" data-stage="{escape(stage)}"><h4>{escape(stage)}</h4>'
            '<p class="absent">not evaluated on this study</p></div>'
        )
    missed, hallucinated = finding_diff(reference_labels, row["pred_labels"])
    scores = "".join(f"<tr><th>{escape(k)}</th><td>{v:.3f}</td></tr>" for k, v in row["scores"].items())
    lists = []
    if missed:
        lists.append(f'<li class="missed-list">missed: {_chips(missed, "missed")}</li>')
    if hallucinated:
        lists.append(f'<li class="hallucinated-list">hallucinated: {_chips(hallucinated, "hallucinated")}</li>')
    if not lists:
        lists.append('<li class="agree">CheXpert findings agree with the reference</li>')
    return (
        f'<div class="report generated" data-stage="{escape(stage)}"><h4>{escape(stage)}</h4>'
        f'<p class="text">{escape(row["prediction"])}</p>'
        f'<ul class="findings">{"".join(lists)}</ul>'
        f'<table class="report-scores">{scores}</table></div>'
    )


def _study_html(study_id: str, data: RunEval, thumb_size: int) -> str:
    first = next(data.predictions[s][study_id] for s in data.stages if study_id in data.predictions[s])
    positives = sorted(o for o, c in first["ref_labels"].items() if c == POSITIVE)
    columns = "".join(_report_column(s, data.predictions[s].get(study_id), first["ref_labels"]) for s in data.stages)
    return (
        f'<article class="study" id="study-{escape(study_id)}"><h3>{escape(study_id)}</h3>'
        f'<div class="images">{_images_html(first["images"], thumb_size)}</div>'
        f'<div class="reports"><div class="report reference"><h4>reference</h4>'
        f'<p class="text">{escape(first["reference"])}</p>'
        f'<ul class="findings"><li>positive: {_chips(positives, "reference-finding") or "none"}</li></ul></div>'
        f"{columns}</div></article>"
    )


def _scores_table(data: RunEval) -> str:
    header = "".join(f"<th>{escape(name)}</th>" for name, _ in TABLE_COLUMNS)
    rows = []
    for stage in data.stages:
        values = [table_value(data.scores[stage].get("scores", {}), keys) for _, keys in TABLE_COLUMNS]
        cells = "".join('<td class="skipped">skip</td>' if v is None else f"<td>{v:.3f}</td>" for v in values)
        rows.append(f"<tr><th>{escape(stage)}</th>{cells}</tr>")
    return f'<table class="scores"><tr><th>stage</th>{header}</tr>{"".join(rows)}</table>'


def _summary_html(data: RunEval) -> str:
    steps, rewards = data.reward_curve
    if steps:
        curve = line_plot(steps, rewards, "RL reward over training", "step", REWARD_KEY, css_id="reward-curve")
    else:
        curve = '<p class="absent">no RL reward curve (ppo/metrics.jsonl missing or without reward/mean)</p>'
    columns = dict(TABLE_COLUMNS)
    panels = {}
    for name in BAR_COLUMNS:
        values = {s: table_value(data.scores[s].get("scores", {}), columns[name]) for s in data.stages}
        present = {s: v for s, v in values.items() if v is not None}
        if present:
            panels[name] = present
    bars = bar_panels(panels, data.stages, "Main metrics per stage", css_id="metric-bars") if panels else ""
    return (
        f'<section id="summary"><h2>Summary</h2>{_scores_table(data)}<div class="plots">{curve}{bars}</div></section>'
    )


def render_html(run_root: str | Path, max_studies: int | None = 50, thumb_size: int = 192) -> str:
    """The viewer page of a run.

    Args:
        run_root: the run root (with ``eval/`` written by rlhf_rrg.evaluate_run).
        max_studies: studies shown (in the first stage's order); None shows all.
        thumb_size: largest thumbnail side in px.

    Returns:
        The complete HTML document.
    """
    data = load_run_eval(run_root)
    ids = list(dict.fromkeys(i for s in data.stages for i in data.predictions[s]))
    shown = ids if max_studies is None else ids[:max_studies]
    css = resources.files("rlhf_rrg.viewer").joinpath("style.css").read_text(encoding="utf-8")
    studies = "".join(_study_html(i, data, thumb_size) for i in shown)
    title = f"rlhf-rrg evaluation: {Path(run_root).resolve().name}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{css}</style></head><body><h1>{escape(title)}</h1>{_summary_html(data)}"
        f'<section id="studies"><h2>Studies ({len(shown)} of {len(ids)})</h2>{studies}</section></body></html>\n'
    )
