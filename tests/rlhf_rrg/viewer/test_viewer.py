"""Tests for the HTML viewer: parsed structure (always) and the page as rendered by headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rlhf_rrg.evaluate_run import per_report_rows
from rlhf_rrg.viewer import finding_diff, render_html
from rlhf_rrg.viewer.__main__ import main
from rlhf_rrg.viewer.plots import nice_ticks

REFERENCES = [
    "mild cardiomegaly . no pleural effusion .",
    "the lungs are clear . no pneumothorax .",
    "small left pleural effusion .",
]
PREDICTIONS = {
    "sft": ["mild cardiomegaly . no pleural effusion .", "large right pleural effusion .", "the lungs are clear ."],
    "ppo": ["mild cardiomegaly .", "the lungs are clear .", "small left pleural effusion . small pneumothorax ."],
}
# Per stage: (missed, hallucinated) positive findings, from the rule labeler's reading of the texts above.
# "the lungs are clear" reads as No Finding, so predicting it for an effusion also hallucinates No Finding.
EXPECTED_MISSED = {"sft": 2, "ppo": 0}  # sft: No Finding (study 1), Pleural Effusion (study 2)
EXPECTED_HALLUCINATED = {"sft": 2, "ppo": 1}  # sft: Pleural Effusion, No Finding; ppo: Pneumothorax
REWARDS = [0.1, 0.3, 0.2, 0.5, 0.6]


def _write_eval(root: Path) -> Path:
    run = root / "run"
    images = []
    for i in range(3):
        path = root / "img" / f"s{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (400, 300), 60 * i).save(path)
        images.append([str(path)])
    images[2].append(str(root / "img" / "gone.png"))  # a view that no longer exists
    for stage, preds in PREDICTIONS.items():
        out = run / "eval" / stage
        out.mkdir(parents=True)
        rows = per_report_rows(["s0", "s1", "s2"], images, REFERENCES, preds)
        (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        scores = {"bleu_4": 0.2 if stage == "sft" else 0.25, "rouge_l": 0.4, "cider": 1.7, "ce/micro_f1_14": 0.3}
        (out / "scores.json").write_text(json.dumps({"n": 3, "scores": scores, "skipped": {"radgraph": "no weights"}}))
    (run / "ppo").mkdir()
    metrics = [{"step": s + 1, "reward/mean": r, "rollout/kl": 0.01} for s, r in enumerate(REWARDS)]
    (run / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in [{"step": 0}, *metrics]))
    return run


class Page(HTMLParser):
    """Collects the elements the assertions need from an HTML document."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.studies: list[str] = []
        self.findings: dict[str, list[str]] = {"missed": [], "hallucinated": []}
        self.columns: list[str] = []
        self.images: list[str] = []
        self.svg_ids: list[str] = []
        self.polylines: list[str] = []
        self.bars: list[dict[str, str]] = []
        self.external: list[str] = []
        self._finding: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "script" or a.get("src", "").startswith("http") or a.get("href", "").startswith("http"):
            self.external.append(tag)
        if tag == "article" and "study" in classes:
            self.studies.append(a["id"])
        if tag == "div" and "generated" in classes:
            self.columns.append(a["data-stage"])
        if tag == "span" and "finding" in classes:
            self._finding = next((k for k in self.findings if k in classes), None)
        if tag == "img":
            self.images.append(a["src"])
        if tag == "svg":
            self.svg_ids.append(a.get("id", ""))
        if tag == "polyline":
            self.polylines.append(a["points"])
        if tag == "rect" and "bar" in classes:
            self.bars.append(a)

    def handle_data(self, data: str) -> None:
        if self._finding is not None:
            self.findings[self._finding].append(f"{self.columns[-1]}:{data}")
            self._finding = None


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    return _write_eval(tmp_path)


def _check_page(page: Page) -> None:
    assert page.studies == ["study-s0", "study-s1", "study-s2"]
    assert page.columns == ["sft", "ppo"] * 3  # pipeline order, one column per stage and study
    for stage in PREDICTIONS:
        assert sum(f.startswith(stage) for f in page.findings["missed"]) == EXPECTED_MISSED[stage]
        assert sum(f.startswith(stage) for f in page.findings["hallucinated"]) == EXPECTED_HALLUCINATED[stage]
    assert "ppo:Pneumothorax" in page.findings["hallucinated"]
    assert "sft:Pleural Effusion" in page.findings["missed"]
    assert {"reward-curve", "metric-bars"} <= set(page.svg_ids)
    assert len(page.polylines) == 1 and len(page.polylines[0].split()) == len(REWARDS)
    # Bars: B4, R-L, CIDEr, CE-F1 for both stages; RadGraph was skipped so it has no panel.
    assert sorted((b["data-metric"], b["data-stage"]) for b in page.bars) == sorted(
        (m, s) for m in ("B4", "R-L", "CIDEr", "CE-F1") for s in ("sft", "ppo")
    )
    assert not page.external


def test_page_structure(run_root: Path) -> None:
    html = render_html(run_root, thumb_size=64)
    page = Page(html)
    _check_page(page)
    assert len(page.images) == 3 and "image not readable" in html and "gone.png" in html
    header, payload = page.images[0].split(",", 1)
    assert header == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(payload))) as thumb:
        assert thumb.format == "PNG" and max(thumb.size) == 64
    # The reward curve rises left to right where the rewards do: SVG y grows downwards.
    ys = [float(p.split(",")[1]) for p in page.polylines[0].split()]
    assert [a > b for a, b in zip(ys, ys[1:], strict=False)] == [
        r2 > r1 for r1, r2 in zip(REWARDS, REWARDS[1:], strict=False)
    ]
    heights = {b["data-stage"]: float(b["height"]) for b in page.bars if b["data-metric"] == "B4"}
    assert heights["ppo"] > heights["sft"]


def test_max_studies_and_cli(run_root: Path, tmp_path: Path) -> None:
    assert Page(render_html(run_root, max_studies=2)).studies == ["study-s0", "study-s1"]
    out = main(["--run-root", str(run_root)])
    assert out == run_root / "eval" / "viewer.html" and "Studies (3 of 3)" in out.read_text()
    with pytest.raises(SystemExit, match="no <stage>/predictions.jsonl"):
        main(["--run-root", str(tmp_path / "empty"), "--out", str(tmp_path / "v.html")])


def test_finding_diff_uses_positive_codes_only() -> None:
    ref = {"Cardiomegaly": 1, "Edema": 3, "Pleural Effusion": 2, "Atelectasis": 1}
    pred = {"Cardiomegaly": 1, "Edema": 1, "Pleural Effusion": 1, "Atelectasis": 3}
    assert finding_diff(ref, pred) == (["Atelectasis"], ["Edema", "Pleural Effusion"])


def test_nice_ticks_cover_range_with_round_steps() -> None:
    # Step = the smallest of 1, 2, 5 x 10^k at least (hi - lo) / 4.
    assert nice_ticks(0.1, 0.6) == [0.0, 0.2, 0.4, 0.6]
    assert nice_ticks(1, 47) == [0, 20, 40, 60]
    assert nice_ticks(0, 1) == [0.0, 0.5, 1.0]
    assert nice_ticks(2.0, 2.0) == [2.0, 2.5, 3.0]  # a flat series still gets a non-degenerate axis


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI: apt-get install -y chromium)")
def test_rendered_in_headless_chromium(run_root: Path, tmp_path: Path) -> None:
    page_path = main(["--run-root", str(run_root), "--out", str(tmp_path / "viewer.html")])
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = page_path.resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    _check_page(Page(dom.stdout))
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,900", url], capture_output=True, timeout=120
    )
    assert run.returncode == 0 and shot.is_file()
    with Image.open(shot) as img:
        assert img.size == (1200, 900)
        # Not a blank page: the rendered text, plots and thumbnails give many distinct grey levels.
        assert len(np.unique(np.asarray(img.convert("L")))) > 20
