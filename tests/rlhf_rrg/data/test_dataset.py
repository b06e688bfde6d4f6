"""ReportDataset / build_dataset on every layout; views, defaults, corrupt images at __getitem__ time."""

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from rewards.observations import CHEXPERT_14
from rlhf_rrg.config import ConfigError, load_config
from rlhf_rrg.data.annotation import DataError
from rlhf_rrg.data.dataset import DataConfig, build_dataset
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.testing.fixtures import write_chexpert_plus_fixture, write_iu_xray_fixture, write_mimic_cxr_fixture


def test_synthetic_items(tmp_path: Path) -> None:
    ann = write_synthetic_dataset(tmp_path, SyntheticConfig(n_train=3, n_val=1, n_test=1, image_size=32, views=2))
    cfg = DataConfig(dataset="synthetic", annotation_path=ann, image_root=tmp_path / "images", image_size=24, views=2)
    ds = build_dataset(cfg, "train", train=False)
    item = ds[1]
    assert set(item) == {"id", "pixel_values", "report", "labels", "index"}
    assert item["id"] == "synth_train_000001" and item["index"] == 1
    assert item["pixel_values"].shape == (2, 3, 24, 24) and item["pixel_values"].dtype == torch.float32
    assert item["report"].endswith(" .") and item["report"] == item["report"].lower()
    raw = ds.studies[1].labels
    assert item["labels"].dtype == torch.long and item["labels"].tolist() == [raw[n] for n in CHEXPERT_14]
    # Evaluation is deterministic; training augments.
    torch.testing.assert_close(ds[0]["pixel_values"], ds[0]["pixel_values"])
    train = build_dataset(cfg, "train", train=True)
    assert not torch.allclose(train[0]["pixel_values"], ds[0]["pixel_values"])


def test_iu_xray_defaults(tmp_path: Path) -> None:
    fx = write_iu_xray_fixture(tmp_path)
    cfg = DataConfig(
        dataset="iu_xray", annotation_path=fx.annotation_path, image_root=fx.image_root, image_size=16, views=2
    )
    assert cfg.resolved_max_words == 60 and cfg.resolved_cleaner == "iu_xray"
    ds = build_dataset(cfg, "val", train=False)
    assert len(ds) == 3 and ds[1]["pixel_values"].shape == (2, 3, 16, 16)
    assert ds[1]["report"] == "borderline cardiomegaly . midline sternotomy xxxx . enlarged pulmonary arteries ."
    assert ds[1]["labels"] is None
    # R2Gen keeps max_seq_length - 1 words ([0] + ids + [0] cut to max_seq_length); the old cut only on request.
    short = build_dataset(DataConfig(**{**cfg.__dict__, "max_words": 3}), "val", train=False)
    assert short[1]["report"] == "borderline cardiomegaly"
    old = build_dataset(DataConfig(**{**cfg.__dict__, "max_words": 3, "truncation": "words"}), "val", train=False)
    assert old[1]["report"] == "borderline cardiomegaly ."


def test_mimic_views_and_cleaner(tmp_path: Path) -> None:
    fx = write_mimic_cxr_fixture(tmp_path)
    cfg = DataConfig(dataset="mimic_cxr", annotation_path=fx.annotation_path, image_root=fx.image_root, image_size=16)
    ds = build_dataset(cfg, "test", train=False)
    assert ds[1]["pixel_values"].shape == (1, 3, 16, 16)
    # Truncation re-joins on single spaces, as R2Gen's whitespace tokenizer would see it.
    assert ds[1]["report"] == "heart size is mildly enlarged . small left pleural effusion . no pneumothorax ."
    assert cfg.resolved_max_words == 100
    two = DataConfig(**{**cfg.__dict__, "views": 2})
    with pytest.raises(DataError, match=r"test study .* has 1 image\(s\), field 'image_path' needs views=2"):
        build_dataset(two, "test", train=False)
    with pytest.raises(DataError, match="no studies"):
        build_dataset(DataConfig(**{**two.__dict__, "on_error": "skip"}), "test", train=False)


def test_chexpert_plus_csv_and_json(tmp_path: Path) -> None:
    csv_fx, json_fx = write_chexpert_plus_fixture(tmp_path)
    cfg = DataConfig(
        dataset="chexpert_plus",
        annotation_path=csv_fx.annotation_path,
        image_root=csv_fx.image_root,
        image_size=16,
        views=2,
        image_suffix=".png",
        skip_empty_findings=True,
    )
    (item,) = build_dataset(cfg, "train", train=False)
    assert item["report"] == "heart size is normal . no effusion ." and item["pixel_values"].shape == (2, 3, 16, 16)
    jcfg = DataConfig(
        dataset="chexpert_plus", annotation_path=json_fx.annotation_path, image_root=json_fx.image_root, image_size=16
    )
    assert build_dataset(jcfg, "val", train=False)[0]["report"] == "small right pleural effusion ."


def test_corrupt_image_at_getitem(tmp_path: Path) -> None:
    fx = write_iu_xray_fixture(tmp_path)
    broken = fx.image_root / "CXR1_IM-1001" / "1.png"
    broken.write_bytes(b"garbage")
    cfg = DataConfig(
        dataset="iu_xray", annotation_path=fx.annotation_path, image_root=fx.image_root, image_size=8, views=2
    )
    ds = build_dataset(cfg, "train", train=False)
    with pytest.raises(
        DataError, match=r"study 'CXR1_IM-1001' \(index 1\): .*CXR1_IM-1001/1\.png: cannot decode image"
    ):
        ds[1]
    # A file damaged after the dataset was built: the next study stands in, and the item says which it is.
    ds.on_error = "skip"
    assert ds[1]["id"] == "CXR2_IM-1002" and ds[1]["index"] == 2
    assert ds.skipped_indices == {1} and ds[0]["index"] == 0


def test_skip_drops_unreadable_studies_when_built_so_ids_never_repeat(tmp_path: Path, caplog) -> None:
    fx = write_iu_xray_fixture(tmp_path)
    (fx.image_root / "CXR1_IM-1001" / "1.png").write_bytes(b"garbage")
    bomb = fx.image_root / "CXR2_IM-1002" / "0.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # above PIL's warning limit
    cfg = DataConfig(dataset="iu_xray", annotation_path=fx.annotation_path, image_root=fx.image_root, image_size=8,
                     views=2, on_error="skip")
    with caplog.at_level("WARNING"):
        ds = build_dataset(cfg, "train", train=False)
    ids = [ds[i]["id"] for i in range(len(ds))]
    assert len(ids) == len(set(ids)) == 1 and "CXR1_IM-1001" not in ids and "CXR2_IM-1002" not in ids
    assert "CXR1_IM-1001/1.png: cannot decode image" in caplog.text
    assert f"'CXR2_IM-1002': {bomb}: refused as a possible decompression bomb" in caplog.text
    assert "skipped 2 of 3 studies" in caplog.text
    with pytest.raises(DataError, match=r"study .CXR2_IM-1002. \(index 2\): .*decompression bomb"):
        build_dataset(DataConfig(**{**cfg.__dict__, "on_error": "raise"}), "train", train=False)[2]


@pytest.mark.parametrize("report", [". .", "...", " - "])
def test_a_report_of_punctuation_only_is_an_empty_report(tmp_path: Path, report: str) -> None:
    """The cleaner would turn it into the target "." (no word): raise naming file and field, or skip the study."""
    fx = write_iu_xray_fixture(tmp_path)
    annotation = json.loads(fx.annotation_path.read_text())
    annotation["train"][1]["report"] = report
    fx.annotation_path.write_text(json.dumps(annotation))
    cfg = DataConfig(dataset="iu_xray", annotation_path=fx.annotation_path, image_root=fx.image_root, image_size=8,
                     views=2)
    where = re.escape(f"{fx.annotation_path}: train[1]")
    with pytest.raises(DataError, match=rf"{where} .*field 'report' has no words"):
        build_dataset(cfg, "train", train=False)
    kept = build_dataset(DataConfig(**{**cfg.__dict__, "on_error": "skip"}), "train", train=False)
    assert [s.id for s in kept.studies] == [annotation["train"][i]["id"] for i in (0, 2)]
    assert all(kept.report(i).replace(".", "").strip() for i in range(len(kept)))


def test_data_config_validation_and_yaml(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="views"):
        DataConfig(views=0)
    with pytest.raises(ValueError, match="image_suffix"):
        DataConfig(image_suffix="png")
    yaml_path = tmp_path / "data.yaml"
    yaml_path.write_text("dataset: iu_xray\nviews: 2\naugment:\n  max_rotation_deg: 3\n")
    cfg = load_config(DataConfig, yaml_path, ["--image_size", "64", "--mean", "[0.5, 0.5, 0.5]"])
    assert (
        cfg.views == 2 and cfg.augment.max_rotation_deg == 3.0 and cfg.image_size == 64 and cfg.mean == (0.5, 0.5, 0.5)
    )
    with pytest.raises(ConfigError, match="dataset"):
        load_config(DataConfig, None, ["--dataset", "padchest"])
