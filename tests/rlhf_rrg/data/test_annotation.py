"""Readers on fixtures in the exact IU-Xray / MIMIC-CXR / CheXpert Plus layouts, and every bad-input case."""

import csv
import json
import logging
from pathlib import Path

import pytest

from rlhf_rrg.data.annotation import (
    CHEXPERT_PLUS_TEST_FRACTION,
    DataError,
    chexpert_plus_split,
    read_chexpert_plus_csv,
    read_r2gen_annotation,
)
from rlhf_rrg.testing.fixtures import (
    IU_REPORTS,
    write_chexpert_plus_fixture,
    write_iu_xray_fixture,
    write_mimic_cxr_fixture,
)


def test_iu_xray_two_views(tmp_path: Path) -> None:
    fx = write_iu_xray_fixture(tmp_path)
    studies = read_r2gen_annotation(fx.annotation_path, fx.image_root, "train")
    assert len(studies) == 3 and studies.skipped == {}
    first = studies[0]
    assert first.id == "CXR0_IM-1000" and first.split == "train" and first.report == IU_REPORTS[0]
    assert first.image_paths == [fx.image_root.resolve() / "CXR0_IM-1000" / f"{v}.png" for v in (0, 1)]
    assert all(p.is_absolute() and p.is_file() for p in first.image_paths)
    assert first.labels is None and first.extra == {}
    assert [s.id for s in read_r2gen_annotation(fx.annotation_path, fx.image_root, "test")][0] == "CXR200_IM-1020"


def test_mimic_cxr_nested_files(tmp_path: Path) -> None:
    fx = write_mimic_cxr_fixture(tmp_path)
    study = read_r2gen_annotation(fx.annotation_path, fx.image_root, "val")[1]
    assert study.extra == {"study_id": 50414278, "subject_id": 10000043}
    (path,) = study.image_paths
    assert path.relative_to(fx.image_root.resolve()).parts[:3] == ("p10", "p10000043", "s50414278")
    assert path.suffix == ".jpg" and path.is_file()


def test_chexpert_plus_csv_groups_views_frontal_first(tmp_path: Path) -> None:
    csv_fx, _ = write_chexpert_plus_fixture(tmp_path)
    train = read_chexpert_plus_csv(
        csv_fx.annotation_path, csv_fx.image_root, "train", image_suffix=".png", skip_empty_findings=True
    )
    assert [s.id for s in train] == ["train/patient00001/study1"]
    assert train.skipped == {"empty_findings": 1}
    study = train[0]
    assert study.report == "Heart size is normal. No effusion."
    assert [p.name for p in study.image_paths] == ["view1_frontal.png", "view2_lateral.png"]
    assert study.extra == {"deid_patient_id": "patient00001", "frontal_lateral": ["Frontal", "Lateral"]}
    val = read_chexpert_plus_csv(csv_fx.annotation_path, csv_fx.image_root, "val", image_suffix=".png")
    assert [(s.id, s.split) for s in val] == [("valid/patient00003/study1", "val")]


def test_chexpert_plus_csv_errors(tmp_path: Path) -> None:
    csv_fx, _ = write_chexpert_plus_fixture(tmp_path)
    path, root = csv_fx.annotation_path, csv_fx.image_root
    with pytest.raises(
        DataError, match=r"line 4 \(study train/patient00002/study1\): field 'section_findings' is empty"
    ):
        read_chexpert_plus_csv(path, root, "train", image_suffix=".png")
    # As listed (.jpg), the images are missing.
    with pytest.raises(
        DataError, match=r"line 2 .*field 'image_path' names a missing image file .*view1_frontal\.jpg"
    ):
        read_chexpert_plus_csv(path, root, "train", skip_empty_findings=True)
    skipped = read_chexpert_plus_csv(path, root, "train", on_error="skip")
    assert len(skipped) == 0 and skipped.skipped == {"empty_report": 1, "missing_image": 1}
    only_valid = tmp_path / "valid_only.csv"
    only_valid.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                                  if not line.startswith("train/")))
    with pytest.raises(DataError, match=r"no rows of split 'test' \(CSV splits: \['valid'\]"):
        read_chexpert_plus_csv(only_valid, root, "test")
    bad = tmp_path / "bad.csv"
    bad.write_text("path_to_image,split\nx.png,train\n")
    with pytest.raises(DataError, match=r"bad\.csv: missing column 'section_findings'"):
        read_chexpert_plus_csv(bad, root, "train")


def test_chexpert_plus_test_split_is_a_patient_level_hold_out_of_train(tmp_path: Path) -> None:
    csv_fx, _ = write_chexpert_plus_fixture(tmp_path)
    (study,) = read_chexpert_plus_csv(csv_fx.annotation_path, csv_fx.image_root, "test", image_suffix=".png")
    assert (study.id, study.split, study.report) == ("train/patient00006/study1", "test", "Mild cardiomegaly.")
    # The hold-out is decided per patient (a hash of the id), so it does not depend on row order.
    patients = [f"patient{i:05d}" for i in range(2000)]
    held_out = {p for p in patients if chexpert_plus_split("train", p) == "test"}
    assert abs(len(held_out) / len(patients) - CHEXPERT_PLUS_TEST_FRACTION) < 0.02
    assert chexpert_plus_split("valid", "patient00006") == "val"
    assert chexpert_plus_split("train", "patient00006", test_fraction=0.0) == "train"


def test_chexpert_plus_json(tmp_path: Path) -> None:
    _, json_fx = write_chexpert_plus_fixture(tmp_path)
    (study,) = read_r2gen_annotation(json_fx.annotation_path, json_fx.image_root, "val")
    assert study.image_paths == [json_fx.image_root.resolve() / "valid/patient00003/study1/view1_frontal.png"]


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(data))
    return path


def _record(tmp_path: Path, study_id: str, **fields: object) -> dict:
    image = tmp_path / "images" / f"{study_id}.png"
    image.parent.mkdir(exist_ok=True)
    image.write_bytes(b"")
    return {"id": study_id, "report": "Normal.", "image_path": [f"{study_id}.png"], "split": "train", **fields}


def test_chexpert_plus_findings_of_punctuation_only_are_empty(tmp_path: Path) -> None:
    csv_fx, _ = write_chexpert_plus_fixture(tmp_path)
    path, root = csv_fx.annotation_path, csv_fx.image_root
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames, list(reader)
    for row in rows:
        if row["deid_patient_id"] == "patient00006":  # the only study of the test split
            row["section_findings"] = "..."
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match=r"line 6 \(study train/patient00006/study1\): field 'section_findings' has "
                                        r"no words \('\.\.\.'\)"):
        read_chexpert_plus_csv(path, root, "test", image_suffix=".png")
    skipped = read_chexpert_plus_csv(path, root, "test", image_suffix=".png", on_error="skip")
    assert len(skipped) == 0 and skipped.skipped == {"empty_report": 1}
    dropped = read_chexpert_plus_csv(path, root, "test", image_suffix=".png", skip_empty_findings=True)
    assert len(dropped) == 0 and dropped.skipped == {"empty_findings": 1}


def test_malformed_json_and_missing_split(tmp_path: Path) -> None:
    path = tmp_path / "annotation.json"
    path.write_text('{"train": [\n{"id": 1,}]}')
    with pytest.raises(DataError, match=r"annotation\.json: malformed JSON at line 2 column"):
        read_r2gen_annotation(path, tmp_path, "train")
    path = _write(tmp_path, {"train": []})
    with pytest.raises(DataError, match=r"annotation\.json: missing split 'val' \(present: \['train'\]\)"):
        read_r2gen_annotation(path, tmp_path, "val", on_error="skip")
    with pytest.raises(DataError, match="cannot read annotation file"):
        read_r2gen_annotation(tmp_path / "nope.json", tmp_path, "train")


@pytest.mark.parametrize(
    ("change", "message", "reason"),
    [
        ({"report": "  "}, r"train\[1\] \(id='bad'\): field 'report' is empty", "empty_report"),
        # Punctuation only: R2Gen's cleaners leave a lone "." of it, a target without a word.
        ({"report": ". ."}, r"train\[1\] \(id='bad'\): field 'report' has no words \('\. \.'\)", "empty_report"),
        ({"report": " ...\n"}, r"field 'report' has no words \('\.\.\.'\)", "empty_report"),
        (
            {"image_path": ["missing.png"]},
            r"train\[1\] \(id='bad'\): field 'image_path' names a missing image file .*missing\.png",
            "missing_image",
        ),
        (
            {"labels": {"Cardiomegaly": 5}},
            r"train\[1\] \(id='bad'\): field 'labels' has code 5 for 'Cardiomegaly'",
            "bad_labels",
        ),
        ({"labels": {"Heart": 1}}, r"field 'labels' has unknown observation 'Heart'", "bad_labels"),
        ({"image_path": []}, r"field 'image_path' must be a non-empty list", "bad_image_path"),
    ],
)
def test_bad_record_raises_or_skips(tmp_path: Path, change: dict, message: str, reason: str) -> None:
    records = [_record(tmp_path, "good"), {**_record(tmp_path, "bad"), **change}, _record(tmp_path, "good2")]
    path = _write(tmp_path, {"train": records})
    with pytest.raises(DataError, match=message) as info:
        read_r2gen_annotation(path, tmp_path / "images", "train")
    assert str(path) in str(info.value)
    studies = read_r2gen_annotation(path, tmp_path / "images", "train", on_error="skip")
    assert [s.id for s in studies] == ["good", "good2"] and studies.skipped == {reason: 1}


def test_missing_field_named(tmp_path: Path) -> None:
    bad = _record(tmp_path, "x")
    del bad["report"]
    path = _write(tmp_path, {"train": [bad, {"report": "a", "image_path": ["x.png"]}]})
    with pytest.raises(DataError, match=r"train\[0\] \(id='x'\): missing field 'report'"):
        read_r2gen_annotation(path, tmp_path / "images", "train")
    with pytest.raises(DataError, match=r"train\[1\]: missing field 'id'"):
        read_r2gen_annotation(
            _write(tmp_path, {"train": [bad | {"report": "a"}, {"report": "a"}]}), tmp_path / "images", "train"
        )


def test_skip_summary_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = [
        _record(tmp_path, "a", report=""),
        _record(tmp_path, "b", report=""),
        _record(tmp_path, "c", image_path=["z.png"]),
    ]
    path = _write(tmp_path, {"train": records})
    with caplog.at_level(logging.WARNING):
        studies = read_r2gen_annotation(path, tmp_path / "images", "train", on_error="skip")
    assert len(studies) == 0 and studies.skipped == {"empty_report": 2, "missing_image": 1}
    assert "skipped 3 record(s) (empty_report: 2, missing_image: 1)" in caplog.text


def test_labels_are_read(tmp_path: Path) -> None:
    path = _write(tmp_path, {"train": [_record(tmp_path, "a", labels={"Cardiomegaly": 1, "No Finding": 0})]})
    (study,) = read_r2gen_annotation(path, tmp_path / "images", "train")
    assert study.labels == {"Cardiomegaly": 1, "No Finding": 0}
