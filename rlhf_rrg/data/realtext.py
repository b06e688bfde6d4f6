"""Real report language on rendered images: a benchmark set whose reports are radiologists' prose.

Each study keeps its real report, id and split (IU X-ray or MIMIC-CXR R2Gen ``annotation.json``, or the
official CheXpert Plus CSV's findings section). Its CheXpert-14 labels are the dataset's own where the
record has them, else the configured labeler's. One image per view is drawn by the synthetic renderer
(:mod:`rlhf_rrg.data.synthetic`) with the findings the labels name: laterality, lung zone and size come
from the sentences that state the finding ("small left effusion", "right upper lobe opacity", "8 mm
nodule"), and are drawn at random where the text does not say. Uncertain findings are drawn as present
(a hedged finding is usually visible to the radiologist who hedged). Findings the renderer cannot draw
(atelectasis, fracture, pleural other, enlarged cardiomediastinum) stay invisible, as subtle findings are
on real films; pneumonia is drawn as the consolidation it is seen as.

So a model can read every drawable finding from the image but must write it in real prose: the gap that
templated reports hide. Nothing here ships report text; it reads a file the user supplies.

CLI: ``python -m rlhf_rrg.data.realtext --reports-from ANNOTATION --out DIR [--n-test 200 --views 1]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rewards.clinical import LABELERS, build_labeler
from rewards.labeler import label_report, split_sentences
from rewards.observations import CHEXPERT_14, POSITIVE, UNCERTAIN
from rlhf_rrg.data.annotation import SPLITS, DataError, load_annotation_json, read_chexpert_plus_csv
from rlhf_rrg.data.synthetic import (
    DEVICES,
    SIDES,
    ZONES,
    Findings,
    Lesion,
    render_frontal,
    render_lateral,
    sample_geometry,
    sample_textures,
)

logger = logging.getLogger(__name__)

# Observations the renderer draws, and the one that stands in for another on the film.
DRAWABLE: tuple[str, ...] = (
    "Cardiomegaly",
    "Pleural Effusion",
    "Pneumothorax",
    "Consolidation",
    "Pneumonia",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Support Devices",
)
_SIZES = {"small": 0, "tiny": 0, "trace": 0, "minimal": 0, "mild": 0, "moderate": 1, "large": 2, "severe": 2,
          "marked": 2, "massive": 2, "extensive": 2}
_ZONE_WORDS = {
    "upper": ("upper", "apical", "apex", "apices", "apicoposterior"),
    "middle": ("middle", "mid", "lingula", "lingular", "perihilar", "hilar", "midlung"),
    "lower": ("lower", "base", "bases", "basilar", "basal", "bibasilar", "retrocardiac", "infrahilar"),
}
_DEVICE_WORDS = {
    "endotracheal tube": r"endotracheal|\bett?\b|tracheostomy",
    "enteric tube": r"nasogastric|orogastric|enteric|feeding|\bng\b|\bog\b|dobhoff",
    "central venous catheter": r"catheter|picc|\bline\b|port|pacemaker|pacer|\bleads?\b|defibrillator|swan",
}
_MEASURE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(mm|cm)\b")


@dataclass
class RealTextConfig:
    """Which studies are kept, how they are labelled and how their images are drawn."""

    reports_from: Path = field(metadata={"help": "R2Gen annotation.json (IU X-ray, MIMIC-CXR) or CheXpert Plus CSV."})
    n_train: int = field(default=-1, metadata={"help": "Training studies kept (-1: all)."})
    n_val: int = field(default=-1, metadata={"help": "Validation studies kept (-1: all)."})
    n_test: int = field(default=-1, metadata={"help": "Test studies kept (-1: all); a fixed sample by id hash."})
    image_size: int = field(default=64, metadata={"help": "Square image side in pixels."})
    views: int = field(default=1, metadata={"help": "1 (frontal) or 2 (frontal + lateral) images per study."})
    seed: int = field(default=0, metadata={"help": "Seed of the drawn geometry and unstated finding details."})
    labeler: str = field(default="rule", metadata={"help": f"Labels reports without dataset labels: {LABELERS}."})
    labeler_path: str | None = field(default=None, metadata={"help": "CheXbert weights for labeler 'chexbert'."})

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < -1:
                raise ValueError(f"{name} must be -1 (all) or >= 0, got {getattr(self, name)}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if self.views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {self.views}")
        if self.labeler not in LABELERS:
            raise ValueError(f"labeler must be one of {LABELERS}, got {self.labeler!r}")


@dataclass(frozen=True)
class ReportRecord:
    """One study's report as the source file gives it (no images yet)."""

    id: str
    report: str
    split: str
    labels: dict[str, int] | None = None


# ----------------------------------------------------------------------------------------------- reading


def _r2gen_records(path: Path) -> list[ReportRecord]:
    records = []
    for key, items in load_annotation_json(path).items():
        if not isinstance(items, list):
            raise DataError(f"{path}: split {key!r} must be a list of records, got {type(items).__name__}")
        for index, item in enumerate(items):
            where = f"{path}: {key!r}[{index}]"
            if not isinstance(item, dict) or not isinstance(item.get("report"), str) or "id" not in item:
                raise DataError(f"{where}: a record needs 'id' and a string 'report'")
            # The split is the record's own where the key is not one (one public IU X-ray copy keys its test
            # split by four spaces).
            split = key.strip() if key.strip() in SPLITS else str(item.get("split", "")).strip()
            if split not in SPLITS:
                raise DataError(f"{where}: split {key!r} / field 'split' {item.get('split')!r} is not in {SPLITS}")
            labels = item.get("labels")
            if labels is not None and (not isinstance(labels, dict) or set(labels) - set(CHEXPERT_14)):
                raise DataError(f"{where} (id={item['id']!r}): field 'labels' must map CheXpert-14 names to codes")
            records.append(ReportRecord(str(item["id"]), item["report"], split, labels))
    return records


def _chexpert_plus_records(path: Path) -> list[ReportRecord]:
    records = []
    for split in SPLITS:
        studies = read_chexpert_plus_csv(path, path.parent, split, skip_empty_findings=True, check_images=False)
        records += [ReportRecord(s.id, s.report, split) for s in studies]
    return records


def read_report_records(path: str | Path) -> list[ReportRecord]:
    """Every study with a non-empty report in an R2Gen ``annotation.json`` or the CheXpert Plus CSV.

    Raises:
        DataError: unreadable or malformed file, a record without id or report, an unknown split.
    """
    path = Path(path)
    records = _chexpert_plus_records(path) if path.suffix.lower() == ".csv" else _r2gen_records(path)
    kept = [r for r in records if r.report.strip()]
    if len(kept) < len(records):
        logger.warning("%s: dropped %d record(s) with an empty report", path, len(records) - len(kept))
    if not kept:
        raise DataError(f"{path}: no record with a non-empty report")
    return kept


def _stable_key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def select(records: list[ReportRecord], n: int) -> list[ReportRecord]:
    """The ``n`` records with the lowest id hash (all for -1), in file order: a fixed sample on every machine."""
    if n < 0 or n >= len(records):
        return records
    keep = {r.id for r in sorted(records, key=lambda r: _stable_key(r.id))[:n]}
    return [r for r in records if r.id in keep]


# ----------------------------------------------------------------------------------------------- text -> drawing


def _stating(report: str, observation: str) -> list[str]:
    """The report's sentences that state ``observation`` as present or uncertain."""
    col = CHEXPERT_14.index(observation)
    return [s for s in split_sentences(report) if label_report(s)[col] in (POSITIVE, UNCERTAIN)]


def _words(sentences: list[str]) -> set[str]:
    return {w for s in sentences for w in re.findall(r"[a-z]+", s)}


def sides_stated(sentences: list[str]) -> tuple[str, ...]:
    """The sides the sentences name: ("right",), ("left",), both, or () when they name none."""
    words = _words(sentences)
    if words & {"bilateral", "bilaterally", "both", "bibasilar", "bibasal"}:
        return SIDES
    return tuple(side for side in SIDES if side in words)


def zone_stated(sentences: list[str]) -> str | None:
    """The lung zone the sentences name (upper, middle, lower), or None."""
    words = _words(sentences)
    return next((zone for zone in ZONES if words & set(_ZONE_WORDS[zone])), None)


def size_stated(sentences: list[str]) -> int | None:
    """0 small, 1 moderate, 2 large from the size words of the sentences, or None."""
    found = [_SIZES[w] for w in _words(sentences) if w in _SIZES]
    return max(found) if found else None


def device_stated(sentences: list[str]) -> str | None:
    """The renderer's device that the sentences describe, or None."""
    text = " ".join(sentences)
    return next((device for device, pattern in _DEVICE_WORDS.items() if re.search(pattern, text)), None)


def nodule_radius_stated(sentences: list[str]) -> float | None:
    """Nodule radius as a fraction of the image side from a stated "N mm" / "N cm" (25 cm field of view)."""
    match = _MEASURE_RE.search(" ".join(sentences))
    if match is None:
        return None
    mm = float(match.group(1)) * (10.0 if match.group(2) == "cm" else 1.0)
    return float(np.clip(mm / 500.0, 0.012, 0.04))


def _side(rng: np.random.Generator, stated: tuple[str, ...]) -> str:
    return stated[rng.integers(len(stated))] if stated else SIDES[rng.integers(2)]


def _lesion(rng: np.random.Generator, sentences: list[str], r_lo: float, r_hi: float) -> Lesion:
    zone = zone_stated(sentences)
    return Lesion(
        side=_side(rng, sides_stated(sentences)),
        zone=zone if zone is not None else ZONES[rng.integers(3)],
        lateral=float(rng.uniform()),
        vertical=float(rng.uniform()),
        radius=float(rng.uniform(r_lo, r_hi)),
    )


def findings_from_report(report: str, labels: dict[str, int], rng: np.random.Generator) -> Findings:
    """The drawable findings of one study: present where its label is positive or uncertain, with laterality,
    zone and size from the sentences that state them, drawn from ``rng`` where the text is silent.

    Args:
        report: the study's report.
        labels: CheXpert observation -> code (missing observations are blank).
        rng: the study's generator (seeded by the study's id, so its images are fixed); the details the text
            states are not drawn.
    """
    present = {obs for obs in DRAWABLE if labels.get(obs) in (POSITIVE, UNCERTAIN)}
    said = {obs: _stating(report, obs) if obs in present else [] for obs in DRAWABLE}
    draws = rng.uniform(size=6)
    ctr = 0.38 + draws[0] * 0.08
    if "Cardiomegaly" in present:
        low, high = {None: (0.56, 0.64), 0: (0.54, 0.58), 1: (0.58, 0.62), 2: (0.62, 0.68)}[
            size_stated(said["Cardiomegaly"])]
        ctr = low + draws[0] * (high - low)

    effusions: tuple[tuple[str, float], ...] = ()
    if "Pleural Effusion" in present:
        sentences = said["Pleural Effusion"]
        sides = sides_stated(sentences) or (SIDES[int(draws[1] * 2)],)
        depth_lo = {None: 0.14, 0: 0.12, 1: 0.2, 2: 0.28}[size_stated(sentences)]
        effusions = tuple((side, float(depth_lo + 0.08 * draws[2])) for side in sides)
    pneumothorax = None
    if "Pneumothorax" in present:
        sentences = said["Pneumothorax"]
        rim_lo = {None: 0.18, 0: 0.14, 1: 0.22, 2: 0.3}[size_stated(sentences)]
        pneumothorax = (_side(rng, sides_stated(sentences)), float(rim_lo + 0.08 * draws[3]))
    consolidation_said = said["Consolidation"] + said["Pneumonia"]
    consolidation = _lesion(rng, consolidation_said, 0.06, 0.085)
    opacity = _lesion(rng, said["Lung Opacity"], 0.07, 0.1)
    nodule = _lesion(rng, said["Lung Lesion"], 0.014, 0.02)
    radius = nodule_radius_stated(said["Lung Lesion"])
    if radius is not None:
        nodule = Lesion(nodule.side, nodule.zone, nodule.lateral, nodule.vertical, radius)
    device = device_stated(said["Support Devices"]) or DEVICES[int(draws[4] * len(DEVICES))]
    return Findings(
        ctr=float(ctr),
        effusions=effusions,
        pneumothorax=pneumothorax,
        consolidation=consolidation if {"Consolidation", "Pneumonia"} & present else None,
        opacity=opacity if "Lung Opacity" in present else None,
        nodule=nodule if "Lung Lesion" in present else None,
        edema="Edema" in present,
        device=device if "Support Devices" in present else None,
    )


# ----------------------------------------------------------------------------------------------- writing


def _folder_name(study_id: str) -> str:
    """A file-system-safe folder for a study id (CheXpert Plus ids hold slashes)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", study_id)


def render_study(
    record: ReportRecord, labels: dict[str, int], cfg: RealTextConfig
) -> list[np.ndarray]:
    """The study's images (frontal, then lateral with ``views=2``), deterministic in (seed, id)."""
    rng = np.random.default_rng([cfg.seed, _stable_key(record.id)])
    findings = findings_from_report(record.report, labels, rng)
    geometry = sample_geometry(rng)
    textures = sample_textures(rng, cfg.image_size)
    images = [render_frontal(findings, geometry, cfg.image_size, textures)]
    if cfg.views == 2:
        images.append(render_lateral(findings, geometry, cfg.image_size, textures))
    return images


def write_realtext_dataset(out_dir: str | Path, cfg: RealTextConfig) -> Path:
    """Writes ``images/<id>/<view>.png`` and an R2Gen-layout ``annotation.json`` with labels under ``out_dir``.

    Args:
        out_dir: destination folder (created if needed).
        cfg: the report source, split sizes, labeler and rendering settings.

    Returns:
        Path of the written ``annotation.json``.

    Raises:
        DataError: the report source cannot be read.
    """
    out_dir = Path(out_dir)
    records = read_report_records(cfg.reports_from)
    caps = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    by_split = {split: select([r for r in records if r.split == split], caps[split]) for split in SPLITS}
    unlabelled = [r for split in SPLITS for r in by_split[split] if r.labels is None]
    codes = []
    if unlabelled:
        codes = build_labeler(cfg.labeler, cfg.labeler_path).label([r.report for r in unlabelled]).tolist()
    computed = {r.id: dict(zip(CHEXPERT_14, row, strict=True)) for r, row in zip(unlabelled, codes, strict=True)}
    annotation: dict[str, list[dict[str, object]]] = {}
    for split in SPLITS:
        rows = []
        for record in by_split[split]:
            labels = record.labels if record.labels is not None else computed[record.id]
            folder = _folder_name(record.id)
            (out_dir / "images" / folder).mkdir(parents=True, exist_ok=True)
            rel_paths = []
            for view, pixels in enumerate(render_study(record, labels, cfg)):
                rel = f"{folder}/{view}.png"
                Image.fromarray(pixels).save(out_dir / "images" / rel, format="PNG", optimize=False)
                rel_paths.append(rel)
            rows.append({"id": record.id, "report": record.report, "image_path": rel_paths, "split": split,
                         "labels": labels})
        annotation[split] = rows
        positives = Counter(o for row in rows for o, c in row["labels"].items() if c in (POSITIVE, UNCERTAIN))
        logger.info("%s: %d studies; positive or uncertain: %s", split, len(rows), dict(positives.most_common()))
    path = out_dir / "annotation.json"
    path.write_text(json.dumps(annotation, indent=1) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description="Render images for real reports (R2Gen layout with labels).")
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    for f in dataclasses.fields(RealTextConfig):
        option = f"--{f.name.replace('_', '-')}"
        if f.name == "reports_from":
            parser.add_argument(option, type=Path, required=True, help=f.metadata["help"])
        else:
            kind = str if f.name.startswith("labeler") else int
            parser.add_argument(option, type=kind, default=f.default, help=f.metadata["help"])
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    try:
        write_realtext_dataset(out, RealTextConfig(**args))
    except (DataError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
