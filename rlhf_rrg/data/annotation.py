"""Readers for the published on-disk layouts of IU-Xray, MIMIC-CXR and CheXpert Plus (and our synthetic set).

Two layouts are supported:

- R2Gen ``annotation.json``: ``{"train"|"val"|"test": [{"id", "report", "image_path": [...], "split", ...}]}``
  with image paths relative to an image root. IU-Xray lists two views per study (``<id>/0.png``,
  ``<id>/1.png``); MIMIC-CXR one image per entry (``p10/p10000032/s5.../x.jpg``) plus ``study_id`` and
  ``subject_id``; the CXPMRG-Bench CheXpert Plus release and our synthetic set use the same layout.
- The official CheXpert Plus ``df_chexpert_plus_240401.csv``: one row per image (``path_to_image``,
  ``split`` in {train, valid}, ``deid_patient_id``, ``frontal_lateral``, ``section_findings``, ...), grouped
  here into studies by their ``patientN/studyM`` folder; the report is the findings section. The CSV has no
  test split: "val" is the official "valid" split and "test" is carved from "train" by patient (see
  :func:`chexpert_plus_split`), so no patient is in two splits and every machine gets the same split.

File-level problems (unreadable or malformed file, missing split) always raise :class:`DataError`.
Record-level problems (missing field, empty report, missing image, bad labels) raise too, unless
``on_error="skip"``: then the record is dropped, counted per reason and a summary is logged. A report of
punctuation only (``". ."``, ``"..."``) is empty: R2Gen's cleaners reduce it to a lone ``"."``, a target with no word.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE, UNCERTAIN

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
OnError = Literal["raise", "skip"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
# The official CheXpert Plus CSV calls the validation split "valid" and has no test split.
_CSV_SPLIT_NAMES = {"train": "train", "valid": "val", "test": "test"}
# Share of the CSV's training patients held out as our CheXpert Plus test split.
CHEXPERT_PLUS_TEST_FRACTION = 0.1
_LABEL_CODES = frozenset({BLANK, POSITIVE, NEGATIVE, UNCERTAIN})


class DataError(ValueError):
    """A data file or record does not match the layout it claims; the message names file, record and field.

    Attributes:
        reason: a short category (e.g. "missing_image", "empty_report") used to count skipped records.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Study:
    """One report with its images.

    Attributes:
        id: the study identifier from the annotation file.
        report: the raw (uncleaned) report text.
        image_paths: absolute image paths, in annotation order (frontal first for CheXpert Plus).
        split: "train", "val" or "test".
        labels: CheXpert observation name -> label code, or None when the source has none.
        extra: any other fields of the record (e.g. ``study_id``, ``subject_id``, ``deid_patient_id``).
    """

    id: str
    report: str
    image_paths: list[Path]
    split: str
    labels: dict[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudySplit:
    """The studies of one split, with how many records were skipped and why (empty unless on_error="skip")."""

    studies: list[Study]
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.studies)

    def __iter__(self) -> Iterator[Study]:
        return iter(self.studies)

    def __getitem__(self, index: int) -> Study:
        return self.studies[index]


class _SkipLog:
    """Raises or counts record-level errors according to ``on_error``."""

    def __init__(self, source: Path, on_error: OnError) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.source = source
        self.on_error = on_error
        self.counts: Counter[str] = Counter()

    def handle(self, err: DataError) -> None:
        if self.on_error == "raise":
            raise err
        self.counts[err.reason] += 1
        logger.debug("skipping record: %s", err)

    def summarize(self, split: str) -> dict[str, int]:
        if self.counts:
            detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items()))
            logger.warning("%s [%s]: skipped %d record(s) (%s)", self.source, split, sum(self.counts.values()), detail)
        return dict(self.counts)


def _validate_labels(raw: Any, where: str) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: field 'labels' must be a mapping of observation -> code, got {raw!r}", "bad_labels")
    unknown = sorted(set(raw) - set(CHEXPERT_14))
    if unknown:
        raise DataError(f"{where}: field 'labels' has unknown observation {unknown[0]!r}", "bad_labels")
    labels: dict[str, int] = {}
    for name, code in raw.items():
        if isinstance(code, bool) or not isinstance(code, int) or code not in _LABEL_CODES:
            raise DataError(
                f"{where}: field 'labels' has code {code!r} for {name!r} (valid: 0, 1, 2, 3)", "bad_labels"
            )
        labels[name] = code
    return labels


def _emptiness(report: str) -> str | None:
    """Why ``report`` has nothing to learn or score ("is empty", "has no words ('. .')"), or None if it has a word."""
    if not report.strip():
        return "is empty"
    if not any(ch.isalnum() for ch in report):
        return f"has no words ({report.strip()[:40]!r})"
    return None


def _resolve_images(rel_paths: list[str], image_root: Path, where: str, check_images: bool) -> list[Path]:
    paths = [(image_root / p).resolve() for p in rel_paths]
    if check_images:
        for path in paths:
            if not path.is_file():
                raise DataError(f"{where}: field 'image_path' names a missing image file {path}", "missing_image")
    return paths


def _parse_r2gen_record(
    record: Any, index: int, split: str, path: Path, image_root: Path, check_images: bool
) -> Study:
    where = f"{path}: {split}[{index}]"
    if not isinstance(record, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(record).__name__}", "bad_record")
    if "id" in record:
        where = f"{where} (id={record['id']!r})"
    for key in ("id", "report", "image_path"):
        if key not in record:
            raise DataError(f"{where}: missing field '{key}'", f"missing_{key}")
    report = record["report"]
    empty = _emptiness(report) if isinstance(report, str) else "is empty"
    if empty is not None:
        raise DataError(f"{where}: field 'report' {empty}", "empty_report")
    rel_paths = record["image_path"]
    if isinstance(rel_paths, str):
        rel_paths = [rel_paths]
    if not isinstance(rel_paths, list) or not rel_paths or not all(isinstance(p, str) for p in rel_paths):
        raise DataError(f"{where}: field 'image_path' must be a non-empty list of paths", "bad_image_path")
    images = _resolve_images(rel_paths, image_root, where, check_images)
    labels = _validate_labels(record["labels"], where) if record.get("labels") is not None else None
    extra = {k: v for k, v in record.items() if k not in ("id", "report", "image_path", "split", "labels")}
    return Study(id=str(record["id"]), report=report, image_paths=images, split=split, labels=labels, extra=extra)


def load_annotation_json(path: Path) -> dict[str, Any]:
    """The top-level object of an R2Gen-style ``annotation.json``.

    Raises:
        DataError: the file cannot be read, is not valid JSON, or is not an object.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"{path}: cannot read annotation file ({err})") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be an object with splits {SPLITS}, got {type(data).__name__}")
    return data


def read_r2gen_annotation(
    path: str | Path,
    image_root: str | Path,
    split: Split,
    on_error: OnError = "raise",
    check_images: bool = True,
) -> StudySplit:
    """Reads one split of an R2Gen-style ``annotation.json`` (IU-Xray, MIMIC-CXR, CheXpert Plus, synthetic).

    Args:
        path: the annotation file.
        image_root: the folder the ``image_path`` entries are relative to (R2Gen's ``image_dir``).
        split: "train", "val" or "test".
        on_error: "raise" on the first bad record, or "skip" bad records (counted in ``skipped`` and logged).
        check_images: whether every image file must exist (one ``stat`` per image).

    Returns:
        The split's studies, in file order.

    Raises:
        DataError: the file is missing or not valid JSON, the split is absent, or (with on_error="raise")
            a record lacks a field, has an empty report, bad labels or a missing image.
    """
    path, image_root = Path(path), Path(image_root)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data = load_annotation_json(path)
    if split not in data:
        raise DataError(f"{path}: missing split '{split}' (present: {sorted(data)})")
    records = data[split]
    if not isinstance(records, list):
        raise DataError(f"{path}: split '{split}' must be a list of records, got {type(records).__name__}")
    log = _SkipLog(path, on_error)
    studies = []
    for index, record in enumerate(records):
        try:
            studies.append(_parse_r2gen_record(record, index, split, path, image_root, check_images))
        except DataError as err:
            log.handle(err)
    return StudySplit(studies=studies, skipped=log.summarize(split))


_CHEXPERT_PLUS_REQUIRED = ("path_to_image", "split", "section_findings")


def _study_key(path_to_image: str) -> str:
    # "train/patient00001/study1/view1_frontal.jpg" -> "train/patient00001/study1"
    return str(Path(path_to_image).parent)


def _patient_key(path_to_image: str) -> str:
    # "train/patient00001/study1/view1_frontal.jpg" -> "patient00001"
    return Path(path_to_image).parent.parent.name


def chexpert_plus_split(csv_split: str, patient_id: str, test_fraction: float = CHEXPERT_PLUS_TEST_FRACTION) -> str:
    """Our split of a CheXpert Plus CSV row: "valid" is "val"; a "train" patient is "test" when the first 8 bytes
    of SHA-256(``patient_id``), read as a fraction of 2**64, fall below ``test_fraction``, else "train".

    The hash (not a seeded shuffle) keeps a patient's split fixed when rows are added, removed or reordered.
    """
    split = _CSV_SPLIT_NAMES.get(csv_split, csv_split)
    if split != "train":
        return split
    digest = hashlib.sha256(patient_id.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") < test_fraction * 2**64 else "train"


def read_chexpert_plus_csv(
    path: str | Path,
    image_root: str | Path,
    split: Split,
    on_error: OnError = "raise",
    skip_empty_findings: bool = False,
    image_suffix: str | None = None,
    check_images: bool = True,
) -> StudySplit:
    """Reads one split of the official CheXpert Plus ``df_chexpert_plus_240401.csv``, findings section.

    Rows (one per image) are grouped into studies by their ``patientN/studyM`` folder; frontal views come
    first. The CSV's "valid" split is returned as "val"; "test" is the patient-level hold-out of the CSV's
    "train" split given by :func:`chexpert_plus_split` (``CHEXPERT_PLUS_TEST_FRACTION`` of the patients).

    Args:
        path: the CSV file.
        image_root: the folder ``path_to_image`` is relative to (e.g. the ``PNG/`` root).
        split: "train", "val" or "test".
        on_error: "raise" on the first bad study, or "skip" bad studies (counted and logged).
        skip_empty_findings: drop studies without a findings section (about a third of CheXpert Plus) and
            count them as "empty_findings" instead of treating them as errors.
        image_suffix: replace the listed file suffix (``.jpg`` in the CSV) by this one, e.g. ".png" for the
            PNG release; None keeps the paths as listed.
        check_images: whether every image file must exist.

    Returns:
        The split's studies in first-appearance order, ``extra`` holding ``deid_patient_id`` and
        ``frontal_lateral`` (one entry per image).

    Raises:
        DataError: unreadable file, missing columns, a split absent from the CSV, or (with on_error="raise")
            an empty findings section (unless skip_empty_findings) or a missing image file.
    """
    path, image_root = Path(path), Path(image_root)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in _CHEXPERT_PLUS_REQUIRED if c not in columns]
            if missing:
                raise DataError(f"{path}: missing column '{missing[0]}' (columns: {columns})")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read CSV ({err})") from err
    groups: dict[str, list[tuple[int, dict[str, str]]]] = {}
    present = set()
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        row_split = chexpert_plus_split(row["split"], row.get("deid_patient_id") or _patient_key(row["path_to_image"]))
        present.add(row_split)
        if row_split == split:
            groups.setdefault(_study_key(row["path_to_image"]), []).append((line, row))
    if split not in present:
        raise DataError(f"{path}: no rows of split '{split}' (CSV splits: {sorted({r['split'] for r in rows})}; "
                        f"'test' holds {CHEXPERT_PLUS_TEST_FRACTION:.0%} of the 'train' patients)")

    log = _SkipLog(path, on_error)
    studies = []
    for key, members in groups.items():
        first_line, first = members[0]
        where = f"{path}: line {first_line} (study {key})"
        findings = (first.get("section_findings") or "").strip()
        empty = _emptiness(findings)
        if empty is not None:
            if skip_empty_findings:
                log.counts["empty_findings"] += 1
                continue
            log.handle(DataError(f"{where}: field 'section_findings' {empty}", "empty_report"))
            continue
        # Frontal views first: single-view models read the first image.
        members = sorted(members, key=lambda m: m[1].get("frontal_lateral", "") != "Frontal")
        rel_paths = [m[1]["path_to_image"] for m in members]
        if image_suffix is not None:
            rel_paths = [str(Path(p).with_suffix(image_suffix)) for p in rel_paths]
        try:
            images = _resolve_images(rel_paths, image_root, where, check_images)
        except DataError as err:
            log.handle(err)
            continue
        extra = {
            "deid_patient_id": first.get("deid_patient_id"),
            "frontal_lateral": [m[1].get("frontal_lateral") for m in members],
        }
        studies.append(Study(id=key, report=findings, image_paths=images, split=split, extra=extra))
    return StudySplit(studies=studies, skipped=log.summarize(split))
