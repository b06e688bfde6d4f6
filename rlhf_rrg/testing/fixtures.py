"""Tiny datasets written in the exact on-disk layouts of IU-Xray, MIMIC-CXR and CheXpert Plus.

The reports are short real-style texts; images are small random gradients (content is irrelevant to loader
tests). Each writer returns the paths a :class:`rlhf_rrg.data.dataset.DataConfig` needs.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IU_REPORTS = (
    "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
    "1. Borderline cardiomegaly. 2. Midline sternotomy XXXX. 3. Enlarged pulmonary arteries.",
    "No acute cardiopulmonary abnormality.. Heart size normal.",
)
MIMIC_REPORTS = (
    "PA and lateral views of the chest provided. There is no focal consolidation, effusion, or pneumothorax.\n"
    " The cardiomediastinal silhouette is normal. Imaged osseous structures are intact. No free air below the\n"
    " right hemidiaphragm is seen.",
    "Heart size is mildly enlarged. ___ small left pleural effusion. No pneumothorax.",
)


@dataclass(frozen=True)
class FixturePaths:
    """Where a fixture put its annotation file and the root its image paths are relative to."""

    annotation_path: Path
    image_root: Path


def _write_image(path: Path, rng: np.random.Generator, size: int = 24, bits: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :] * rng.uniform(0.5, 1.0)
    pixels = np.clip(ramp + 0.1 * rng.standard_normal((size, size)), 0.0, 1.0)
    if bits == 16:
        Image.fromarray((pixels * 65535).astype(np.uint16)).save(path)
    else:
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path)


def write_iu_xray_fixture(root: Path, seed: int = 0) -> FixturePaths:
    """R2Gen IU-Xray: ``iu_xray/annotation.json`` + ``iu_xray/images/<id>/{0,1}.png`` (two views per study)."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "iu_xray"
    image_root = base / "images"
    annotation: dict[str, list[dict[str, object]]] = {}
    for s, split in enumerate(("train", "val", "test")):
        records = []
        for i, report in enumerate(IU_REPORTS):
            study_id = f"CXR{100 * s + i}_IM-{1000 + 10 * s + i}"
            for view in (0, 1):
                _write_image(image_root / study_id / f"{view}.png", rng)
            records.append(
                {
                    "id": study_id,
                    "report": report,
                    "image_path": [f"{study_id}/0.png", f"{study_id}/1.png"],
                    "split": split,
                }
            )
        annotation[split] = records
    path = base / "annotation.json"
    path.write_text(json.dumps(annotation))
    return FixturePaths(path, image_root)


def write_mimic_cxr_fixture(root: Path, seed: int = 0) -> FixturePaths:
    """R2Gen MIMIC-CXR: one JPG per entry under ``files/p10/p<subject>/s<study>/<dicom>.jpg``."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "mimic_cxr"
    image_root = base / "files"
    annotation: dict[str, list[dict[str, object]]] = {}
    for s, split in enumerate(("train", "val", "test")):
        records = []
        for i, report in enumerate(MIMIC_REPORTS):
            subject, study = 10000032 + 10 * s + i, 50414267 + 10 * s + i
            rel = f"p10/p{subject}/s{study}/{i:08x}-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
            _write_image(image_root / rel, rng)
            records.append(
                {
                    "id": f"{i:08x}-bde0afdd-112c0b34-7bc16630-4e384014",
                    "study_id": study,
                    "subject_id": subject,
                    "report": report,
                    "image_path": [rel],
                    "split": split,
                }
            )
        annotation[split] = records
    path = base / "annotation.json"
    path.write_text(json.dumps(annotation))
    return FixturePaths(path, image_root)


CHEXPERT_PLUS_COLUMNS = (
    "path_to_image",
    "path_to_dcm",
    "frontal_lateral",
    "ap_pa",
    "deid_patient_id",
    "patient_report_date_order",
    "report",
    "section_narrative",
    "section_clinical_history",
    "section_history",
    "section_comparison",
    "section_technique",
    "section_procedure_comments",
    "section_findings",
    "section_impression",
    "section_end_of_impression",
    "section_summary",
    "section_accession_number",
    "age",
    "sex",
    "race",
    "ethnicity",
    "interpreter_needed",
    "insurance_type",
    "recent_bmi",
    "deceased",
    "split",
)


def write_chexpert_plus_fixture(root: Path, seed: int = 0) -> tuple[FixturePaths, FixturePaths]:
    """CheXpert Plus: ``df_chexpert_plus_240401.csv`` (one row per image, ``.jpg`` paths) over a ``PNG/`` root
    holding ``.png`` files (16-bit), plus a CXPMRG-Bench style ``annotation.json`` over the same root.

    Studies: train patient00001/study1 (frontal + lateral, findings), train patient00002/study1 (no findings
    section), valid patient00003/study1 (frontal only, findings), train patient00006/study1 (frontal only,
    findings; in the test split carved from train).

    Returns:
        (csv fixture, json fixture); the CSV's ``path_to_image`` needs ``image_suffix=".png"``.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "chexpert_plus"
    image_root = base / "PNG"
    rows = [
        (
            "train/patient00001/study1/view2_lateral.jpg",
            "Lateral",
            "patient00001",
            "Heart size is normal. No effusion.",
        ),
        (
            "train/patient00001/study1/view1_frontal.jpg",
            "Frontal",
            "patient00001",
            "Heart size is normal. No effusion.",
        ),
        ("train/patient00002/study1/view1_frontal.jpg", "Frontal", "patient00002", ""),
        ("valid/patient00003/study1/view1_frontal.jpg", "Frontal", "patient00003", "Small right pleural effusion."),
        # A training patient that the patient-level hold-out puts in our test split.
        ("train/patient00006/study1/view1_frontal.jpg", "Frontal", "patient00006", "Mild cardiomegaly."),
    ]
    csv_path = base / "df_chexpert_plus_240401.csv"
    base.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CHEXPERT_PLUS_COLUMNS)
        writer.writeheader()
        for path_to_image, view, patient, findings in rows:
            _write_image(image_root / Path(path_to_image).with_suffix(".png"), rng, bits=16)
            row = dict.fromkeys(CHEXPERT_PLUS_COLUMNS, "")
            row.update(
                path_to_image=path_to_image,
                path_to_dcm=str(Path(path_to_image).with_suffix(".dcm")),
                frontal_lateral=view,
                ap_pa="PA" if view == "Frontal" else "",
                deid_patient_id=patient,
                patient_report_date_order="1",
                report=f"FINDINGS: {findings} IMPRESSION: Stable.",
                section_findings=findings,
                section_impression="Stable.",
                split=path_to_image.split("/")[0],
            )
            writer.writerow(row)
    annotation = {
        "train": [
            {
                "id": "patient00001_study1",
                "report": rows[1][3],
                "image_path": ["train/patient00001/study1/view1_frontal.png"],
                "split": "train",
            }
        ],
        "val": [
            {
                "id": "patient00003_study1",
                "report": rows[3][3],
                "image_path": ["valid/patient00003/study1/view1_frontal.png"],
                "split": "val",
            }
        ],
        "test": [
            {
                "id": "patient00003_study1",
                "report": rows[3][3],
                "image_path": ["valid/patient00003/study1/view1_frontal.png"],
                "split": "test",
            }
        ],
    }
    json_path = base / "annotation.json"
    json_path.write_text(json.dumps(annotation))
    return FixturePaths(csv_path, image_root), FixturePaths(json_path, image_root)
