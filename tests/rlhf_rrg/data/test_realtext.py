"""Real-text benchmark builder: every source layout, labels, findings drawn where and as the text says."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE, UNCERTAIN
from rlhf_rrg.data import realtext as R
from rlhf_rrg.data.annotation import DataError, read_r2gen_annotation
from rlhf_rrg.data.synthetic import lung_mask, render_frontal, sample_geometry, sample_textures
from rlhf_rrg.testing.fixtures import (
    IU_REPORTS,
    write_chexpert_plus_fixture,
    write_iu_xray_fixture,
    write_mimic_cxr_fixture,
)


def _labels(**codes: int) -> dict[str, int]:
    labels = dict.fromkeys(CHEXPERT_14, BLANK)
    labels.update({k.replace("_", " "): v for k, v in codes.items()})
    return labels


def _findings(report: str, **codes: int):
    return R.findings_from_report(report, _labels(**codes), np.random.default_rng(0))


def _build(tmp_path: Path, source: Path, **kwargs) -> dict:
    out = tmp_path / "out"
    path = R.write_realtext_dataset(out, R.RealTextConfig(reports_from=source, **kwargs))
    return json.loads(path.read_text())


def test_iu_xray_keeps_reports_ids_splits_and_reads_a_padded_split_key(tmp_path):
    fixture = write_iu_xray_fixture(tmp_path)
    data = json.loads(fixture.annotation_path.read_text())
    # One public copy of IU X-ray's annotation keys its test split by four spaces.
    data["    "] = data.pop("test")
    fixture.annotation_path.write_text(json.dumps(data))
    built = _build(tmp_path, fixture.annotation_path, views=2, image_size=32)
    assert sorted(built) == ["test", "train", "val"]
    for split in ("train", "val", "test"):
        key = "    " if split == "test" else split
        assert [r["id"] for r in built[split]] == [r["id"] for r in data[key]]
        assert [r["report"] for r in built[split]] == list(IU_REPORTS)
        assert all(r["split"] == split and len(r["image_path"]) == 2 for r in built[split])
    # "Borderline cardiomegaly" is uncertain under the rule labeler, a normal report has No Finding.
    first, second = built["train"][0]["labels"], built["train"][1]["labels"]
    assert first["No Finding"] == POSITIVE and second["Cardiomegaly"] in (POSITIVE, UNCERTAIN)
    # The written annotation is an ordinary R2Gen annotation with labels: the stages read it as they are.
    studies = read_r2gen_annotation(tmp_path / "out" / "annotation.json", tmp_path / "out" / "images", "test")
    assert len(studies) == 3 and all(s.labels is not None and len(s.image_paths) == 2 for s in studies)
    assert all(p.is_file() for s in studies for p in s.image_paths)


def test_dataset_labels_are_kept_and_others_come_from_the_labeler(tmp_path):
    fixture = write_mimic_cxr_fixture(tmp_path)
    data = json.loads(fixture.annotation_path.read_text())
    given = _labels(Edema=POSITIVE)
    data["train"][0]["labels"] = given  # the report says nothing of edema: the dataset's labels win
    fixture.annotation_path.write_text(json.dumps(data))
    built = _build(tmp_path, fixture.annotation_path, image_size=32)
    assert built["train"][0]["labels"] == given
    # "Heart size is mildly enlarged ... small left pleural effusion" labelled by the rule labeler.
    labels = built["train"][1]["labels"]
    assert labels["Cardiomegaly"] == POSITIVE and labels["Pleural Effusion"] == POSITIVE
    assert labels["Pneumothorax"] == NEGATIVE
    assert all(len(r["image_path"]) == 1 for split in built.values() for r in split)


def test_chexpert_plus_csv_findings_sections_and_splits(tmp_path):
    csv_fixture, _ = write_chexpert_plus_fixture(tmp_path)
    built = _build(tmp_path, csv_fixture.annotation_path, image_size=32)
    ids = {split: [r["id"] for r in rows] for split, rows in built.items()}
    # The study without a findings section is dropped; valid -> val; patient00006 is held out as test.
    assert ids == {"train": ["train/patient00001/study1"], "val": ["valid/patient00003/study1"],
                   "test": ["train/patient00006/study1"]}
    assert built["val"][0]["report"] == "Small right pleural effusion."
    # Ids with slashes get a flat folder.
    assert built["val"][0]["image_path"] == ["valid_patient00003_study1/0.png"]
    assert (tmp_path / "out" / "images" / "valid_patient00003_study1" / "0.png").is_file()


def test_fixed_test_sample_and_byte_identical_rebuild(tmp_path):
    fixture = write_iu_xray_fixture(tmp_path)
    first = _build(tmp_path, fixture.annotation_path, n_test=2, image_size=32)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "out").rglob("*.png")}
    assert len(first["test"]) == 2 and len(first["train"]) == 3
    again = _build(tmp_path, fixture.annotation_path, n_test=2, image_size=32)
    assert again == first
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "out").rglob("*.png")}


def test_laterality_zone_and_size_follow_the_text():
    left = _findings("There is a small left pleural effusion. The heart is normal.", Pleural_Effusion=POSITIVE)
    assert [side for side, _ in left.effusions] == ["left"] and left.effusions[0][1] < 0.2
    large_right = _findings("Large right-sided pleural effusion.", Pleural_Effusion=POSITIVE)
    assert [side for side, _ in large_right.effusions] == ["right"] and large_right.effusions[0][1] >= 0.28
    both = _findings("Bilateral pleural effusions.", Pleural_Effusion=POSITIVE)
    assert sorted(side for side, _ in both.effusions) == ["left", "right"]
    opacity = _findings("Patchy right upper lobe opacity.", Lung_Opacity=POSITIVE)
    assert (opacity.opacity.side, opacity.opacity.zone) == ("right", "upper")
    basilar = _findings("Left basilar airspace disease may represent pneumonia.", Pneumonia=UNCERTAIN)
    assert basilar.consolidation is not None and (basilar.consolidation.side, basilar.consolidation.zone) == (
        "left", "lower")
    nodule = _findings("A 9 mm nodule in the left lung.", Lung_Lesion=POSITIVE)
    assert nodule.nodule.side == "left" and nodule.nodule.radius == pytest.approx(9 / 500)
    assert _findings("Apical pneumothorax on the left.", Pneumothorax=POSITIVE).pneumothorax[0] == "left"
    assert _findings("Endotracheal tube in place.", Support_Devices=POSITIVE).device == "endotracheal tube"
    severe = _findings("Severe cardiomegaly.", Cardiomegaly=POSITIVE)
    mild = _findings("Mild cardiomegaly.", Cardiomegaly=POSITIVE)
    assert 0.5 < mild.ctr < severe.ctr
    normal = _findings("Normal heart size.", Cardiomegaly=NEGATIVE)
    assert normal.ctr < 0.5 and not normal.effusions and normal.device is None
    # A finding the labels do not hold is not drawn, whatever the text says; an invisible one draws nothing.
    assert not _findings("Small left pleural effusion.").effusions
    assert _findings("Mild atelectasis.", Atelectasis=POSITIVE) == _findings("Mild atelectasis.")


def test_the_stated_side_is_where_the_image_changes():
    """A left effusion darkens nothing and brightens the base of the patient's left lung (the image's right)."""
    report = "Small left pleural effusion."
    with_fluid = _findings(report, Pleural_Effusion=POSITIVE)
    without = _findings(report)
    size = 96
    geometry, textures = sample_geometry(np.random.default_rng(1)), sample_textures(np.random.default_rng(2), size)
    a = render_frontal(with_fluid, geometry, size, textures).astype(int)
    b = render_frontal(without, geometry, size, textures).astype(int)
    changed = np.abs(a - b) > 10
    left, right = lung_mask(geometry, "left", size), lung_mask(geometry, "right", size)
    assert changed[left].mean() > 0.05 and changed[right].mean() < 0.01
    assert (a - b)[changed & left].mean() > 0  # fluid is denser than aerated lung


def test_bad_sources_raise_naming_the_file(tmp_path):
    bad = tmp_path / "annotation.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="annotation.json: malformed JSON"):
        R.read_report_records(bad)
    bad.write_text(json.dumps({"train": [{"id": "a", "report": "Clear.", "split": "train"}],
                               "extra": [{"id": "b", "report": "Clear."}]}))
    with pytest.raises(DataError, match=r"'extra'\[0\].*not in"):
        R.read_report_records(bad)
    bad.write_text(json.dumps({"train": [{"id": "a", "report": "  "}]}))
    with pytest.raises(DataError, match="no record with a non-empty report"):
        R.read_report_records(bad)
    with pytest.raises(ValueError, match="views must be 1 or 2"):
        R.RealTextConfig(reports_from=bad, views=3)


def test_cli_writes_the_set_and_exits_2_on_a_bad_file(tmp_path, capsys):
    fixture = write_iu_xray_fixture(tmp_path)
    R.main(["--reports-from", str(fixture.annotation_path), "--out", str(tmp_path / "cli"), "--image-size", "32"])
    assert (tmp_path / "cli" / "annotation.json").is_file()
    with pytest.raises(SystemExit) as info:
        R.main(["--reports-from", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")])
    assert info.value.code == 2 and "missing.json" in capsys.readouterr().err
