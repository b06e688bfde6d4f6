"""Synthetic CXR generator: determinism, exact labels vs report text, and findings visible where expected."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE
from rlhf_rrg.data import synthetic as S

# Words a reader (or CheXbert) keys each observation on.
KEYWORDS = {
    "Cardiomegaly": ("cardiomegaly", "heart is enlarged", "cardiac silhouette is enlarged"),
    "Pleural Effusion": ("pleural effusion",),
    "Pneumothorax": ("pneumothorax",),
    "Consolidation": ("consolidation",),
    "Lung Opacity": ("opacity",),
    "Lung Lesion": ("nodule",),
    "Edema": ("edema",),
    "Support Devices": ("tube", "catheter", "line"),
}
NEGATION_KEYWORDS = {
    "Cardiomegaly": ("heart size is normal", "heart size is within normal limits", "cardiac silhouette is normal"),
    "Pleural Effusion": ("no pleural effusion",),
    "Pneumothorax": ("no pneumothorax", "pleural effusion or pneumothorax"),
    "Consolidation": ("no focal consolidation",),
    "Edema": ("no pulmonary edema",),
    "Lung Lesion": ("no suspicious pulmonary nodules", "no pulmonary nodule"),
    "Fracture": ("no acute fracture", "no displaced rib fracture"),
    "Enlarged Cardiomediastinum": ("mediastinal contours",),
}


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_byte_identical(tmp_path: Path) -> None:
    cfg = S.SyntheticConfig(n_train=6, n_val=2, n_test=2, image_size=48, views=2, seed=7)
    S.write_synthetic_dataset(tmp_path / "a", cfg)
    S.write_synthetic_dataset(tmp_path / "b", cfg)
    digest = _tree_digest(tmp_path / "a")
    assert len(digest) == 1 + 10 * 2 and digest == _tree_digest(tmp_path / "b")
    S.write_synthetic_dataset(tmp_path / "c", S.SyntheticConfig(**{**cfg.__dict__, "seed": 8}))
    other = _tree_digest(tmp_path / "c")
    assert sum(digest[k] != other[k] for k in digest) >= 15


def test_layout_and_cli(tmp_path: Path) -> None:
    S.main(["--out", str(tmp_path), "--n-train", "3", "--n-val", "1", "--n-test", "2", "--image-size", "40"])
    ann = json.loads((tmp_path / "annotation.json").read_text())
    assert [len(ann[s]) for s in ("train", "val", "test")] == [3, 1, 2]
    record = ann["test"][1]
    assert record["id"] == "synth_test_000001" and record["split"] == "test"
    assert record["image_path"] == ["synth_test_000001/0.png"]
    assert set(record["labels"]) == set(CHEXPERT_14)
    from PIL import Image

    with Image.open(tmp_path / "images" / record["image_path"][0]) as img:
        assert img.size == (40, 40) and img.mode == "L"


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="views"):
        S.SyntheticConfig(views=3)
    with pytest.raises(ValueError, match="p_edema"):
        S.SyntheticConfig(p_edema=1.5)


def test_labels_match_reports() -> None:
    cfg = S.SyntheticConfig(p_effusion=0.3, p_pneumothorax=0.3, p_nodule=0.3, p_edema=0.3, p_support_device=0.3)
    counts = dict.fromkeys(CHEXPERT_14, 0)
    for index in range(400):
        rng = np.random.default_rng([0, 0, index])
        findings = S.sample_findings(cfg, rng)
        S.sample_geometry(rng)
        report, labels = S.compose_report(findings, rng)
        text = report.lower()
        assert set(labels) == set(CHEXPERT_14)
        for name, code in labels.items():
            counts[name] += code == POSITIVE
            if name in KEYWORDS and code == POSITIVE:
                assert any(k in text for k in KEYWORDS[name]), (name, report)
            if name in NEGATION_KEYWORDS:
                said = any(k in text for k in NEGATION_KEYWORDS[name])
                assert said == (code == NEGATIVE), (name, code, report)
            if name in ("Pneumonia", "Atelectasis", "Pleural Other"):
                assert code == BLANK
        # Core findings are always stated one way or the other.
        for name in ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation"):
            assert labels[name] in (POSITIVE, NEGATIVE)
        assert (labels["Cardiomegaly"] == POSITIVE) == (findings.ctr > 0.5)
        others = [n for n in CHEXPERT_14 if n not in ("No Finding", "Support Devices") and labels[n] == POSITIVE]
        assert (labels["No Finding"] == POSITIVE) == (not others)
        assert labels["No Finding"] in (POSITIVE, BLANK)
        sentences = text.split(". ")
        if findings.effusions:
            sides = {s for s, _ in findings.effusions}
            (sentence,) = [t for t in sentences if "effusion" in t]
            assert ("bilateral" in sentence) == (sides == {"left", "right"})
            assert sides == {"left", "right"} or sides.pop() in sentence
        for name, lesion in (
            ("consolidation", findings.consolidation),
            ("opacity", findings.opacity),
            ("nodule", findings.nodule),
        ):
            if lesion is not None:
                (sentence,) = [t for t in sentences if name in t]
                assert S._LOBES[(lesion.side, lesion.zone)] in sentence, (lesion, report)
        if findings.pneumothorax is not None:
            (sentence,) = [t for t in sentences if "pneumothorax" in t]
            assert findings.pneumothorax[0] in sentence
    # Every modelled finding occurs, and normal studies too.
    for name in [*KEYWORDS, "No Finding"]:
        assert counts[name] > 10, (name, counts[name])


def _pair(**kwargs: object) -> tuple[np.ndarray, np.ndarray, S.Geometry]:
    """Frontal renders without / with a finding, same geometry and textures."""
    g = S.Geometry(noise=0.0)
    textures = S.sample_textures(np.random.default_rng(3), 96)
    base = S.render_frontal(S.Findings(ctr=0.42), g, 96, textures).astype(np.float32)
    other = S.render_frontal(S.Findings(**{"ctr": 0.42, **kwargs}), g, 96, textures).astype(np.float32)
    return base, other, g


def _box(
    g: S.Geometry, side: str, x_frac: tuple[float, float], y: tuple[float, float], size: int = 96
) -> tuple[slice, slice]:
    """Pixel box in one lung: x as lateral fractions (0 mediastinum, 1 chest wall), y as image fractions."""
    sign = -1 if side == "right" else 1
    xs = [g.cx + sign * (g.mediastinum + f * (g.half_width - g.mediastinum)) for f in x_frac]
    x0, x1 = sorted(int(x * size) for x in xs)
    return slice(int(y[0] * size), int(y[1] * size)), slice(x0, x1)


@pytest.mark.parametrize("side", ["right", "left"])
def test_effusion_fills_its_costophrenic_angle(side: str) -> None:
    base, eff, g = _pair(effusions=((side, 0.2),))
    floor = S.dome_base(g, side)
    other = "left" if side == "right" else "right"
    angle, far_angle = (
        _box(g, side, (0.7, 0.95), (floor - 0.09, floor - 0.02)),
        _box(g, other, (0.7, 0.95), (floor - 0.09, floor - 0.02)),
    )
    assert eff[angle].mean() > base[angle].mean() + 40
    np.testing.assert_array_equal(eff[far_angle], base[far_angle])
    apex = _box(g, side, (0.3, 0.7), (g.top + 0.05, g.top + 0.15))
    np.testing.assert_array_equal(eff[apex], base[apex])


def test_cardiomegaly_widens_the_heart() -> None:
    g = S.Geometry(noise=0.0)
    textures = S.sample_textures(np.random.default_rng(3), 128)
    widths = []
    for ctr in (0.42, 0.62):
        img = S.render_frontal(S.Findings(ctr=ctr), g, 128, textures)
        _, hy, _, _ = S.heart_box(g, ctr)
        row = img[int(hy * 128)].astype(np.float32)
        widths.append(int((row > 150).sum()))
    thorax_px = 2 * g.half_width * 128
    # Measured CTR within ~3 px of the drawn one (the spine and blur add a little).
    assert abs(widths[0] / thorax_px - 0.42) < 0.05 and abs(widths[1] / thorax_px - 0.62) < 0.05
    assert widths[1] - widths[0] > 0.15 * thorax_px


def test_pneumothorax_darkens_upper_lateral_lung() -> None:
    base, ptx, g = _pair(pneumothorax=("left", 0.25))
    rim = _box(g, "left", (0.82, 0.95), (g.top + 0.1, g.top + 0.3))
    assert ptx[rim].mean() < base[rim].mean() - 10
    assert (ptx[rim] <= base[rim]).all()  # air replaces lung (and its markings) beyond the pleural line
    right = _box(g, "right", (0.82, 0.95), (g.top + 0.1, g.top + 0.3))
    np.testing.assert_array_equal(ptx[right], base[right])


@pytest.mark.parametrize(("side", "zone"), [("right", "upper"), ("left", "lower"), ("right", "middle")])
def test_consolidation_in_its_zone(side: str, zone: str) -> None:
    lesion = S.Lesion(side=side, zone=zone, lateral=0.5, vertical=0.5, radius=0.07)
    base, cons, g = _pair(consolidation=lesion)
    x, y = S.lesion_centre(g, lesion)
    cy, cx = int(y * 96), int(x * 96)
    assert cons[cy - 2 : cy + 3, cx - 2 : cx + 3].mean() > base[cy - 2 : cy + 3, cx - 2 : cx + 3].mean() + 50
    diff = np.abs(cons - base) > 0
    rows, cols = np.nonzero(diff)
    # Changes stay on the lesion's side of the midline and within about a zone of its centre.
    assert np.all(np.sign(cols / 96 - g.cx) == (-1 if side == "right" else 1))
    assert np.abs(rows / 96 - y).max() < (g.base - g.top) / 3


def test_nodule_and_device_are_drawn() -> None:
    lesion = S.Lesion(side="right", zone="middle", lateral=0.5, vertical=0.5, radius=0.018)
    base, nod, g = _pair(nodule=lesion)
    x, y = S.lesion_centre(g, lesion)
    assert nod[int(y * 96), int(x * 96)] > base[int(y * 96), int(x * 96)] + 50
    assert 0 < (np.abs(nod - base) > 0).sum() < 60
    _, dev, _ = _pair(device="endotracheal tube")
    assert (dev > 230).sum() > (base > 230).sum() + 10
