"""Tests for rlhf_rrg.generate: export checks, study grouping, batching, multi-view input and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from rlhf_rrg import generate as gen
from rlhf_rrg.data.images import load_image
from rlhf_rrg.export.save import save_generator
from rlhf_rrg.inference import ReportGenerator
from rlhf_rrg.prompting.generator import PromptingConfig
from rlhf_rrg.retrieval.context import ContextConfig
from rlhf_rrg.testing.fixtures import write_chexpert_plus_fixture, write_iu_xray_fixture
from rlhf_rrg.testing.tiny_models import tiny_rrg


class SpyGenerator:
    """Records every batch it is given and answers with a report naming the study."""

    def __init__(self, views: int, image_size: int = 16) -> None:
        self.views, self.image_size = views, image_size
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.calls: list[tuple[torch.Tensor, list[str] | None, int, int]] = []

    def generate(
        self, pixel_values: torch.Tensor, ids: list[str] | None = None, max_new_tokens: int = 100, num_beams: int = 1
    ) -> list[str]:
        self.calls.append((pixel_values, ids, max_new_tokens, num_beams))
        return [f"report for {i}" for i in ids or []]


def _png(path: Path, value: int, size: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("export")
    tiny = tiny_rrg(tmp)
    prompting = PromptingConfig(context=ContextConfig(mode="none"), views=1)
    return save_generator(ReportGenerator(tiny.model, tiny.processor, prompting), tmp / "export")


def test_check_export_names_path_and_expected_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(gen.CheckpointError, match="nowhere.*config.json, prompting/prompting.yaml and one of model"):
        gen.check_export(missing)
    (tmp_path / "config.json").write_text("{}")
    expected = "missing prompting/prompting.yaml, model.safetensors or model.safetensors.index.json"
    with pytest.raises(gen.CheckpointError, match=expected):
        gen.check_export(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "prompting").mkdir()
    (tmp_path / "prompting" / "prompting.yaml").write_text("views: 1\n")
    assert gen.check_export(tmp_path) == tmp_path


def test_group_images_by_views() -> None:
    studies = gen.group_images(["a/0.png", "a/1.png", "b/0.png", "b/1.png"], 2)
    assert [s.id for s in studies] == ["a/0.png", "b/0.png"]
    assert studies[1].images == (Path("b/0.png"), Path("b/1.png"))
    with pytest.raises(ValueError, match="3 images.*multiple of --study-views 2"):
        gen.group_images(["a", "b", "c"], 2)


def test_batches_carry_views_pixels_and_settings_in_order(tmp_path: Path) -> None:
    paths = [_png(tmp_path / f"s{i}" / f"{v}.png", 40 * i + 10 * v) for i in range(5) for v in range(2)]
    studies = gen.group_images(paths, 2)
    spy = SpyGenerator(views=2)
    rows = gen.generate_for_studies(spy, studies, batch_size=2, max_new_tokens=7, num_beams=3)

    assert [len(ids) for _, ids, _, _ in spy.calls] == [2, 2, 1]
    assert all(pix.shape[1:] == (2, 3, 16, 16) for pix, _, _, _ in spy.calls)
    assert {(m, b) for _, _, m, b in spy.calls} == {(7, 3)}
    # The second view of the third study is the image written for (i=2, v=1), normalised as load_image does.
    expected = load_image(paths[5], 16, spy.mean, spy.std, None)
    torch.testing.assert_close(spy.calls[1][0][0, 1], expected)
    assert [r["id"] for r in rows] == [str(paths[2 * i]) for i in range(5)]
    last = {"id": str(paths[8]), "images": [str(paths[8]), str(paths[9])], "report": f"report for {paths[8]}"}
    assert rows[4] == last


def test_study_with_wrong_view_count_is_rejected(tmp_path: Path) -> None:
    studies = gen.group_images([_png(tmp_path / "a.png", 0)], 1)
    with pytest.raises(ValueError, match="has 1 image.*takes 2 views"):
        gen.generate_for_studies(SpyGenerator(views=2), studies)


def test_annotation_studies_take_first_views(tmp_path: Path) -> None:
    paths = write_iu_xray_fixture(tmp_path)
    studies = gen.annotation_studies(paths.annotation_path, paths.image_root, "test", views=2)
    record = json.loads(paths.annotation_path.read_text())["test"][0]
    assert studies[0].id == record["id"]
    assert studies[0].images == tuple(paths.image_root / p for p in record["image_path"])
    with pytest.raises(gen.DataError, match="has 2 image.*takes 3 views"):
        gen.annotation_studies(paths.annotation_path, paths.image_root, "test", views=3)


def test_cli_matches_direct_generation(tiny_export: Path, tmp_path: Path) -> None:
    images = [_png(tmp_path / f"img{i}.png", 30 * i) for i in range(3)]
    out = tmp_path / "reports.jsonl"
    argv = ["--checkpoint", str(tiny_export), "--images", *map(str, images), "--out", str(out)]
    rows = gen.main([*argv, "--batch-size", "2", "--max-new-tokens", "6"])

    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == rows and [r["images"] for r in rows] == [[str(p)] for p in images]
    generator = ReportGenerator.from_export(tiny_export, device="cpu")
    pixels = torch.stack([load_image(p, generator.image_size, generator.mean, generator.std)[None] for p in images])
    assert [r["report"] for r in rows] == generator.generate(pixels, max_new_tokens=6)


def test_cli_errors_name_the_bad_input(tiny_export: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "r.jsonl")
    with pytest.raises(SystemExit, match=r"checkpoint .*missing_export does not exist.*config.json"):
        gen.main(["--checkpoint", str(tmp_path / "missing_export"), "--images", "x.png", "--out", out])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="broken.png: cannot decode image"):
        gen.main(["--checkpoint", str(tiny_export), "--images", str(broken), "--out", out])
    with pytest.raises(SystemExit, match="--study-views 2 but checkpoint"):
        gen.main(["--checkpoint", str(tiny_export), "--images", str(broken), "--study-views", "2", "--out", out])
    assert Path(out).read_text() == ""


def test_cli_annotation_split_with_two_view_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path)
    prompting = PromptingConfig(context=ContextConfig(mode="none"), views=2)
    export = save_generator(ReportGenerator(tiny.model, tiny.processor, prompting), tmp_path / "export")
    data = write_iu_xray_fixture(tmp_path)
    out = tmp_path / "reports.jsonl"
    argv = [
        "--checkpoint",
        str(export),
        "--annotation",
        str(data.annotation_path),
        "--split",
        "val",
        "--out",
        str(out),
    ]
    rows = gen.main([*argv, "--image-root", str(data.image_root), "--max-new-tokens", "4"])

    records = json.loads(data.annotation_path.read_text())["val"]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert all(
        r["images"] == [str(data.image_root / p) for p in rec["image_path"]]
        for r, rec in zip(rows, records, strict=True)
    )
    assert all(isinstance(r["report"], str) for r in rows)
    with pytest.raises(SystemExit):
        gen.main(["--checkpoint", str(export), "--annotation", str(data.annotation_path), "--out", str(out)])


class FailingGenerator(SpyGenerator):
    """Fails on its ``fail_at``-th generate call, as a crash in a late batch would."""

    def __init__(self, views: int, fail_at: int) -> None:
        super().__init__(views)
        self.fail_at = fail_at

    def generate(self, pixel_values, ids=None, max_new_tokens=100, num_beams=1):
        if len(self.calls) + 1 == self.fail_at:
            raise ValueError("generation failed")
        return super().generate(pixel_values, ids, max_new_tokens, num_beams)


def test_reports_are_streamed_so_a_late_error_keeps_earlier_ones(tmp_path: Path, monkeypatch) -> None:
    images = [str(_png(tmp_path / f"img{i}.png", 30 * i)) for i in range(5)]
    monkeypatch.setattr(gen, "load_generator", lambda path, device: FailingGenerator(views=1, fail_at=3))
    out = tmp_path / "reports.jsonl"
    with pytest.raises(SystemExit, match=rf"generation failed \(4 reports generated before it are in {out}\)"):
        gen.main(["--checkpoint", "x", "--images", *images, "--batch-size", "2", "--out", str(out)])
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == images[:4]


def test_on_error_skip_drops_and_counts_bad_studies(tmp_path: Path, monkeypatch, caplog) -> None:
    images = [str(_png(tmp_path / f"img{i}.png", 30 * i)) for i in range(3)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    monkeypatch.setattr(gen, "load_generator", lambda path, device: SpyGenerator(views=1))
    argv = ["--checkpoint", "x", "--images", images[0], str(broken), *images[1:], "--out", str(tmp_path / "r.jsonl")]
    with pytest.raises(SystemExit, match="broken.png: cannot decode image"):
        gen.main(argv)
    with caplog.at_level("INFO", logger="rlhf_rrg.generate"):
        rows = gen.main([*argv, "--on-error", "skip", "--batch-size", "2"])
    assert [r["id"] for r in rows] == images
    assert "wrote 3 reports" in caplog.text and "skipped 1 studies (bad_image: 1)" in caplog.text


def test_chexpert_plus_csv_options(tmp_path: Path, monkeypatch, caplog) -> None:
    csv_fx, _ = write_chexpert_plus_fixture(tmp_path)
    monkeypatch.setattr(gen, "load_generator", lambda path, device: SpyGenerator(views=1))
    argv = ["--checkpoint", "x", "--annotation", str(csv_fx.annotation_path), "--image-root", str(csv_fx.image_root),
            "--out", str(tmp_path / "r.jsonl")]
    (row,) = gen.main([*argv, "--image-suffix", ".png", "--split", "test"])
    assert row["id"] == "train/patient00006/study1" and row["images"][0].endswith("view1_frontal.png")
    # As listed in the CSV (.jpg) the images are missing; the study without findings is counted on its own.
    with caplog.at_level("INFO", logger="rlhf_rrg.generate"):
        assert gen.main([*argv, "--split", "train", "--skip-empty-findings", "--on-error", "skip"]) == []
    assert "skipped 2 studies (empty_findings: 1, missing_image: 1)" in caplog.text
