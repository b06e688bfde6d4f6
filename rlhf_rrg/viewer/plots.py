"""Inline SVG charts (no JavaScript, no fonts or files fetched): a line plot and per-metric bar panels."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

# Colour-blind-safe (Okabe-Ito) palette, cycled over stages.
PALETTE: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 x 10^k) covering ``[lo, hi]``."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(value, 12))
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def line_plot(
    xs: Sequence[float],
    ys: Sequence[float],
    title: str,
    x_label: str,
    y_label: str,
    width: int = 520,
    height: int = 260,
    css_id: str = "line-plot",
) -> str:
    """An SVG line chart of ``ys`` over ``xs`` with ticked axes.

    Args:
        xs: x values (n,), increasing.
        ys: y values (n,).
        title: chart title (escaped).
        x_label: x-axis label.
        y_label: y-axis label.
        width: SVG width in px.
        height: SVG height in px.
        css_id: the ``id`` attribute of the ``<svg>``.

    Returns:
        The ``<svg>`` element; the curve is a ``<polyline class="curve">`` with one point per value.

    Raises:
        ValueError: ``xs`` and ``ys`` differ in length or are empty.
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"line_plot needs equally long, non-empty xs and ys; got {len(xs)} and {len(ys)}")
    left, right, top, bottom = 60, 15, 30, 45
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(css_id)}" class="plot" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text class="title" x="{width / 2}" y="18" text-anchor="middle">{escape(title)}</text>',
        f'<line class="axis" x1="{left}" y1="{sy(y0)}" x2="{width - right}" y2="{sy(y0)}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{sy(y0)}"/>',
    ]
    for t in x_ticks:
        parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{sy(y0) + 15:.1f}" text-anchor="middle">{_fmt(t)}</text>')
    for t in y_ticks:
        parts.append(f'<line class="grid" x1="{left}" y1="{sy(t):.1f}" x2="{width - right}" y2="{sy(t):.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 5}" y="{sy(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=True))
    parts += [
        f'<polyline class="curve" fill="none" stroke="{PALETTE[0]}" stroke-width="2" points="{points}"/>',
        f'<text class="label" x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">'
        f"{escape(x_label)}</text>",
        f'<text class="label" x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{escape(y_label)}</text>',
        "</svg>",
    ]
    return "\n".join(parts)


def bar_panels(
    panels: Mapping[str, Mapping[str, float]],
    stages: Sequence[str],
    title: str,
    panel_width: int = 150,
    height: int = 220,
    css_id: str = "bar-panels",
) -> str:
    """One SVG of side-by-side bar panels, one per metric, each on its own scale from 0.

    Metrics differ in range (CIDEr can exceed 1, BLEU-4 rarely reaches 0.2), so a shared axis would flatten
    most of them; every bar is labelled with its value instead.

    Args:
        panels: metric -> {stage: value}; stages without a value get no bar.
        stages: stage order, which also fixes each stage's colour (legend).
        title: chart title.
        panel_width: width of one panel in px.
        height: SVG height in px.
        css_id: the ``id`` attribute of the ``<svg>``.

    Returns:
        The ``<svg>``; each bar is ``<rect class="bar" data-metric=... data-stage=... data-value=...>``.
    """
    top, bottom, legend = 30, 40, 22
    width = max(panel_width * len(panels), 200)
    plot_h = height - top - bottom - legend
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(css_id)}" class="plot" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text class="title" x="{width / 2}" y="18" text-anchor="middle">{escape(title)}</text>',
    ]
    colour = {stage: PALETTE[i % len(PALETTE)] for i, stage in enumerate(stages)}
    for p, (metric, values) in enumerate(panels.items()):
        x_left = p * panel_width + 10
        base = top + plot_h
        peak = max([abs(v) for v in values.values()] + [1e-12])
        bar_w = (panel_width - 30) / max(len(stages), 1)
        parts.append(f'<line class="axis" x1="{x_left}" y1="{base}" x2="{x_left + panel_width - 20}" y2="{base}"/>')
        for s, stage in enumerate(stages):
            if stage not in values:
                continue
            value = values[stage]
            h = abs(value) / peak * (plot_h - 14)
            x = x_left + 5 + s * bar_w
            parts.append(
                f'<rect class="bar" data-metric="{escape(metric)}" data-stage="{escape(stage)}" '
                f'data-value="{value:.6g}" x="{x:.1f}" y="{base - h:.1f}" width="{bar_w * 0.8:.1f}" '
                f'height="{h:.1f}" fill="{colour[stage]}"><title>{escape(stage)} {escape(metric)}: '
                f"{value:.4f}</title></rect>"
            )
            parts.append(
                f'<text class="value" x="{x + bar_w * 0.4:.1f}" y="{base - h - 3:.1f}" '
                f'text-anchor="middle">{value:.3f}</text>'
            )
        parts.append(
            f'<text class="label" x="{x_left + (panel_width - 20) / 2}" y="{base + 16}" '
            f'text-anchor="middle">{escape(metric)}</text>'
        )
    for s, stage in enumerate(stages):
        x = 10 + s * 110
        parts.append(f'<rect x="{x}" y="{height - 16}" width="12" height="12" fill="{colour[stage]}"/>')
        parts.append(f'<text class="legend" x="{x + 16}" y="{height - 6}">{escape(stage)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
