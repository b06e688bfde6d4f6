"""A procedural chest X-ray dataset with templated reports and exact CheXpert-14 labels.

Every study samples a set of findings, renders them visibly on a simple anatomical model (body, lungs with
vessel markings, ribs, clavicles, spine, mediastinum, heart, diaphragm domes) and writes a report whose
wording varies but whose content is fixed by the findings. A model can only score well by reading the
image: e.g. "left" vs "right" effusion, which lung zone holds an opacity, whether the heart is wider than
half the thorax. Labels follow the CheXbert conventions: POSITIVE for a described finding, NEGATIVE for an
explicitly negated one, BLANK when the report does not mention it, and "No Finding" positive iff nothing
but support devices is positive.

Frontal views are PA: the patient's right is on the image's left. The optional second view is a lateral.
Everything is drawn from ``numpy.random.default_rng([seed, split, index])``, so the output does not depend
on generation order and the same seed gives byte-identical files.

CLI: ``python -m rlhf_rrg.data.synthetic --out DIR [--n-train N --n-val N --n-test N --views 2 --seed S]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE

logger = logging.getLogger(__name__)

SIDES: tuple[str, ...] = ("right", "left")
ZONES: tuple[str, ...] = ("upper", "middle", "lower")
DEVICES: tuple[str, ...] = ("endotracheal tube", "central venous catheter", "enteric tube")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@dataclass
class SyntheticConfig:
    """Size, resolution, seed and finding prevalences of the synthetic dataset."""

    n_train: int = field(default=1000, metadata={"help": "Number of training studies."})
    n_val: int = field(default=100, metadata={"help": "Number of validation studies."})
    n_test: int = field(default=200, metadata={"help": "Number of test studies."})
    image_size: int = field(default=128, metadata={"help": "Square image side in pixels."})
    views: int = field(default=1, metadata={"help": "1 (frontal PA) or 2 (PA + lateral) images per study."})
    seed: int = field(default=0, metadata={"help": "Master seed; same seed gives byte-identical files."})
    p_cardiomegaly: float = field(default=0.25, metadata={"help": "Prevalence of cardiomegaly (CTR > 0.5)."})
    p_effusion: float = field(default=0.2, metadata={"help": "Prevalence of pleural effusion (L, R or both)."})
    p_pneumothorax: float = field(default=0.1, metadata={"help": "Prevalence of pneumothorax."})
    p_consolidation: float = field(default=0.15, metadata={"help": "Prevalence of a consolidation."})
    p_opacity: float = field(default=0.12, metadata={"help": "Prevalence of a hazy lung opacity."})
    p_nodule: float = field(default=0.1, metadata={"help": "Prevalence of a lung nodule (Lung Lesion)."})
    p_edema: float = field(default=0.1, metadata={"help": "Prevalence of pulmonary edema."})
    p_support_device: float = field(default=0.15, metadata={"help": "Prevalence of a tube or line."})

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if self.views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {self.views}")
        for f in dataclasses.fields(self):
            if f.name.startswith("p_") and not 0.0 <= getattr(self, f.name) <= 1.0:
                raise ValueError(f"{f.name} must be in [0, 1], got {getattr(self, f.name)}")


# ----------------------------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Lesion:
    """A focal finding: its lung, zone, and position within the zone (fractions in [0, 1])."""

    side: str
    zone: str
    lateral: float
    vertical: float
    radius: float


@dataclass(frozen=True)
class Findings:
    """Everything that is abnormal (or not) in one study, with the parameters needed to draw it."""

    ctr: float
    effusions: tuple[tuple[str, float], ...] = ()  # (side, fluid depth as a fraction of lung height)
    pneumothorax: tuple[str, float] | None = None  # (side, rim width as a fraction of lung width)
    consolidation: Lesion | None = None
    opacity: Lesion | None = None
    nodule: Lesion | None = None
    edema: bool = False
    device: str | None = None

    @property
    def cardiomegaly(self) -> bool:
        return self.ctr > 0.5


def _lesion(rng: np.random.Generator, r_lo: float, r_hi: float) -> Lesion:
    return Lesion(
        side=SIDES[rng.integers(2)],
        zone=ZONES[rng.integers(3)],
        lateral=float(rng.uniform()),
        vertical=float(rng.uniform()),
        radius=float(rng.uniform(r_lo, r_hi)),
    )


def sample_findings(cfg: SyntheticConfig, rng: np.random.Generator) -> Findings:
    """Draws one study's findings; every parameter is drawn whether used or not, to keep streams aligned."""
    draws = rng.uniform(size=8)
    cardiomegaly = draws[0] < cfg.p_cardiomegaly
    # A gap around CTR 0.5 keeps the label unambiguous from the image.
    ctr = float(rng.uniform(0.56, 0.66) if cardiomegaly else rng.uniform(0.38, 0.46))
    sides = (("right",), ("left",), ("right", "left"))[rng.choice(3, p=[0.4, 0.4, 0.2])]
    depths = rng.uniform(0.12, 0.3, size=2)
    ptx = (SIDES[rng.integers(2)], float(rng.uniform(0.18, 0.3)))
    consolidation, opacity, nodule = _lesion(rng, 0.06, 0.085), _lesion(rng, 0.07, 0.1), _lesion(rng, 0.014, 0.02)
    device = DEVICES[rng.integers(len(DEVICES))]
    return Findings(
        ctr=ctr,
        effusions=tuple(zip(sides, (float(d) for d in depths), strict=False)) if draws[1] < cfg.p_effusion else (),
        pneumothorax=ptx if draws[2] < cfg.p_pneumothorax else None,
        consolidation=consolidation if draws[3] < cfg.p_consolidation else None,
        opacity=opacity if draws[4] < cfg.p_opacity else None,
        nodule=nodule if draws[5] < cfg.p_nodule else None,
        edema=bool(draws[6] < cfg.p_edema),
        device=device if draws[7] < cfg.p_support_device else None,
    )


# ----------------------------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class Geometry:
    """Patient positioning and exposure, varied per study. Coordinates are fractions of the image side."""

    cx: float = 0.5  # midline
    top: float = 0.14  # lung apices
    base: float = 0.76  # diaphragm (left dome; the right one sits higher)
    half_width: float = 0.36  # thorax half-width at the lateral lung edges
    mediastinum: float = 0.065  # mediastinum half-width above the heart
    gamma: float = 1.0
    exposure: float = 0.0
    noise: float = 0.02


def sample_geometry(rng: np.random.Generator) -> Geometry:
    """Draws positioning (shift, size, inspiration depth) and exposure (gamma, offset, noise level)."""
    scale = float(rng.uniform(0.92, 1.05))
    shift = float(rng.uniform(-0.025, 0.025))
    return Geometry(
        cx=0.5 + float(rng.uniform(-0.03, 0.03)),
        top=0.14 + shift,
        base=0.14 + shift + 0.62 * scale + float(rng.uniform(-0.03, 0.02)),
        half_width=0.36 * scale,
        mediastinum=0.065 * scale,
        gamma=float(rng.uniform(0.85, 1.15)),
        exposure=float(rng.uniform(-0.04, 0.04)),
        noise=float(rng.uniform(0.01, 0.03)),
    )


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return xx, yy


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish noise with features about ``size / cells`` pixels wide."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur (radius 2 sigma) with edge padding."""
    radius = max(1, int(round(2 * sigma_px)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma_px) ** 2).astype(np.float32)
    kernel /= kernel.sum()
    for axis in (0, 1):
        padded = np.pad(img, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        n = img.shape[axis]
        img = sum(w * np.take(padded, np.arange(k, k + n), axis=axis) for k, w in enumerate(kernel))
    return img


def _polyline(xx: np.ndarray, yy: np.ndarray, points: list[tuple[float, float]], width: float) -> np.ndarray:
    """Boolean mask of pixels within ``width`` of a polyline."""
    dist = np.full(xx.shape, np.inf, dtype=np.float32)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy)))
    return dist < width


def _side_sign(side: str) -> float:
    # PA view: the patient's right lung is on the image's left.
    return -1.0 if side == "right" else 1.0


def dome_base(g: Geometry, side: str) -> float:
    """Lowest point of a hemidiaphragm; the right dome sits higher (the liver lies beneath it)."""
    return g.base - (0.025 if side == "right" else 0.0)


def lung_mask(g: Geometry, side: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one lung on the frontal view."""
    xx, yy = _grid(size)
    s = _side_sign(side)
    centre = g.cx + s * (g.mediastinum + g.half_width) / 2
    half = (g.half_width - g.mediastinum) / 2
    a = (xx - centre) / half
    mid = (g.top + g.base) / 2
    b = (yy - mid) / ((g.base + 0.05 - g.top) / 2)
    # Round apex (p=2) but squared-off base (p=5), so the costophrenic angle is sharp unless fluid blunts it.
    shape = np.abs(a) ** 2 * (b < 0) + np.abs(a) ** 5 * (b >= 0) + np.abs(b) ** np.where(b < 0, 2.0, 5.0)
    dome = dome_base(g, side) - 0.07 * (1.0 - np.clip(a, -1.0, 1.0) ** 2)
    return (shape < 1.0) & (yy < dome)


def lateral_fraction(g: Geometry, size: int) -> np.ndarray:
    """Horizontal position within a lung, 0 at the mediastinum and 1 at the lateral chest wall."""
    xx, _ = _grid(size)
    return np.clip((np.abs(xx - g.cx) - g.mediastinum) / (g.half_width - g.mediastinum), 0.0, 1.0)


def lesion_centre(g: Geometry, lesion: Lesion) -> tuple[float, float]:
    """Frontal-view centre (x, y) of a focal finding, inside its lung zone."""
    zone_height = (g.base - g.top) / 3
    y = g.top + ZONES.index(lesion.zone) * zone_height + (0.3 + 0.45 * lesion.vertical) * zone_height
    offset = g.mediastinum + (0.3 + 0.45 * lesion.lateral) * (g.half_width - g.mediastinum)
    x = g.cx + _side_sign(lesion.side) * offset
    return x, y


def heart_box(g: Geometry, ctr: float) -> tuple[float, float, float, float]:
    """Heart ellipse (centre x, centre y, half-width, half-height); its width / thorax width is ``ctr``."""
    return g.cx + 0.03, g.base - 0.13, ctr * g.half_width, 0.12


def sample_textures(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """Noise fields of one study (vessel markings, irregular edges, pixel noise), drawn in a fixed order."""
    # Always drawn, in this order, so two studies that differ only in findings share every texture.
    return {
        "markings": _smooth_noise(rng, size, 14),
        "irregular": _smooth_noise(rng, size, 10),
        "noise": rng.standard_normal((size, size)).astype(np.float32),
        "lateral_noise": rng.standard_normal((size, size)).astype(np.float32),
    }


def _finish(img: np.ndarray, g: Geometry, noise: np.ndarray, size: int) -> np.ndarray:
    img = _blur(img, max(0.6, size / 160))
    img = np.clip(img + g.exposure, 0.0, 1.0) ** g.gamma + g.noise * noise
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_frontal(findings: Findings, g: Geometry, size: int, textures: dict[str, np.ndarray]) -> np.ndarray:
    """Draws the PA view.

    Args:
        findings: what to draw.
        g: positioning and exposure.
        size: image side in pixels.
        textures: noise fields from the study's RNG (see ``sample_textures``).

    Returns:
        uint8 image of shape (size, size).
    """
    xx, yy = _grid(size)
    img = np.full((size, size), 0.04, dtype=np.float32)  # air around the patient
    body = ((xx - g.cx) / (g.half_width + 0.1)) ** 2 + ((yy - 0.62) / 0.75) ** 4 < 1.0
    img[body] = 0.36
    img[body & (yy > g.base - 0.04)] = 0.55  # liver / abdomen under the domes
    lungs = {side: lung_mask(g, side, size) for side in SIDES}
    any_lung = lungs["right"] | lungs["left"]
    frac = lateral_fraction(g, size)
    # Vessel markings: strongest at the hila, fading to the periphery.
    hilum_falloff = np.clip(1.1 - frac, 0.1, 1.0)
    img[any_lung] = (0.13 + 0.05 * textures["markings"] * hilum_falloff)[any_lung]

    if findings.edema:
        haze = 0.16 * np.exp(-(((frac - 0.15) / 0.35) ** 2)) * (np.abs(yy - (g.top + g.base) / 2) < 0.25)
        kerley = (frac > 0.8) & (np.mod(yy - g.base, 0.022) < 0.006) & (yy > g.base - 0.14)
        img = img + (haze + 0.1 * kerley) * any_lung

    if findings.opacity is not None:
        ox, oy = lesion_centre(g, findings.opacity)
        r2 = (xx - ox) ** 2 + (yy - oy) ** 2
        img = img + 0.2 * np.exp(-r2 / (2 * findings.opacity.radius**2)) * lungs[findings.opacity.side]

    if findings.consolidation is not None:
        c = findings.consolidation
        ox, oy = lesion_centre(g, c)
        ragged = np.hypot(xx - ox, yy - oy) / c.radius + 0.25 * textures["irregular"]
        mask = (ragged < 1.0) & lungs[c.side]
        img[mask] = np.maximum(img[mask], 0.46 + 0.03 * textures["markings"][mask])

    if findings.nodule is not None:
        ox, oy = lesion_centre(g, findings.nodule)
        d = np.hypot(xx - ox, yy - oy) / findings.nodule.radius
        img = img + 0.32 * np.clip(1.5 - d, 0.0, 1.0) * any_lung

    for side, depth in findings.effusions:
        level = dome_base(g, side) - depth * (g.base - g.top)
        # Meniscus: fluid climbs the lateral chest wall, blunting the costophrenic angle.
        fluid = lungs[side] & (yy > level - 0.08 * frac**2)
        img[fluid] = 0.5 - 0.05 * (1.0 - frac[fluid])

    if findings.pneumothorax is not None:
        side, rim = findings.pneumothorax
        upper = yy < g.top + 0.6 * (g.base - g.top)
        air = lungs[side] & upper & (frac > 1.0 - rim)
        pleural_line = lungs[side] & upper & (np.abs(frac - (1.0 - rim)) < 0.02)
        img[air] = 0.05  # no lung markings beyond the visceral pleura
        img[pleural_line] = 0.3

    hx, hy, hw, hh = heart_box(g, findings.ctr)
    heart = ((xx - hx) / hw) ** 2 + ((yy - hy) / hh) ** 2 < 1.0
    mediastinum = (np.abs(xx - g.cx) < g.mediastinum) & (yy > g.top - 0.08) & (yy < hy)
    img[heart | mediastinum] = 0.66
    trachea = (np.abs(xx - g.cx) < 0.014) & (yy < g.top + 0.12)
    img[trachea & body] = 0.3
    vertebrae = 0.05 + 0.03 * np.cos(2 * np.pi * (yy - g.top) / 0.055)
    img = img + vertebrae * (np.abs(xx - g.cx) < 0.028) * body
    spacing = (g.base - g.top) / 9
    for k in range(10):
        # Posterior ribs: arcs that drop laterally.
        rib_y = g.top + 0.01 + k * spacing + 0.06 * frac**2
        img = img + 0.08 * (np.abs(yy - rib_y) < 0.009) * (frac > 0.05) * body * (yy < g.base)
    for s in (-1.0, 1.0):
        clavicle = _polyline(xx, yy, [(g.cx + s * 0.05, g.top + 0.02), (g.cx + s * 0.33, g.top - 0.05)], 0.012)
        img = img + 0.12 * clavicle

    if findings.device is not None:
        img[_polyline(xx, yy, _device_path_frontal(findings.device, g), 0.006)] = 0.95
    return _finish(img, g, textures["noise"], size)


def _device_path_frontal(device: str, g: Geometry) -> list[tuple[float, float]]:
    carina = g.top + 0.14
    if device == "endotracheal tube":
        return [(g.cx, 0.0), (g.cx, carina - 0.05)]
    if device == "central venous catheter":  # right internal jugular, tip in the SVC
        return [(g.cx - 0.14, 0.0), (g.cx - 0.06, g.top - 0.02), (g.cx - 0.03, carina + 0.06)]
    return [(g.cx - 0.01, 0.0), (g.cx, g.base - 0.05), (g.cx + 0.12, g.base + 0.1)]  # enteric tube to stomach


def render_lateral(findings: Findings, g: Geometry, size: int, textures: dict[str, np.ndarray]) -> np.ndarray:
    """Draws the lateral view (anterior to the image's left, spine on the right).

    Args:
        findings: what to draw (laterality is not visible on a lateral, by nature).
        g: positioning and exposure (shared with the frontal view).
        size: image side in pixels.
        textures: noise fields from the study's RNG.

    Returns:
        uint8 image of shape (size, size).
    """
    xx, yy = _grid(size)
    img = np.full((size, size), 0.04, dtype=np.float32)
    body = ((xx - 0.5) / 0.4) ** 2 + ((yy - 0.6) / 0.7) ** 4 < 1.0
    img[body] = 0.36
    dome = g.base - 0.06 * (1.0 - ((xx - 0.5) / 0.3) ** 2)
    img[body & (yy > dome)] = 0.55
    lung = (((xx - 0.5) / 0.3) ** 2 + ((yy - (g.top + g.base) / 2) / ((g.base - g.top) / 2 + 0.04)) ** 4 < 1.0) & (
        yy < dome
    )
    img[lung] = (0.16 + 0.04 * textures["markings"])[lung]
    height = g.base - g.top
    for lesion, gain in ((findings.consolidation, 0.3), (findings.opacity, 0.15), (findings.nodule, 0.3)):
        if lesion is not None:
            ly = g.top + (ZONES.index(lesion.zone) + 0.3 + 0.45 * lesion.vertical) * height / 3
            lx = 0.4 + 0.25 * lesion.lateral
            img = img + gain * np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * lesion.radius**2)) * lung
    if findings.edema:
        img = img + 0.12 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.45) ** 2) / 0.02) * lung
    if findings.effusions:
        depth = max(d for _, d in findings.effusions)
        # Fluid collects first in the deep posterior costophrenic sulcus.
        meniscus = 0.08 * np.clip((xx - 0.5) / 0.3, 0.0, 1.0) ** 2
        img[lung & (yy > g.base - depth * height - meniscus) & (xx > 0.45)] = 0.5
    heart = ((xx - 0.36) / (0.1 + 0.2 * (findings.ctr - 0.4))) ** 2 + ((yy - (g.base - 0.12)) / 0.12) ** 2 < 1.0
    img[heart & lung] = 0.58
    spine = (xx > 0.76) & (xx < 0.84) & body
    img = img + (0.12 + 0.06 * (np.mod(yy, 0.055) < 0.045)) * spine
    if findings.device is not None:
        start = 0.45 if findings.device != "central venous catheter" else 0.42
        end = g.top + 0.1 if findings.device != "enteric tube" else g.base + 0.1
        img[_polyline(xx, yy, [(start, 0.0), (start + 0.03, end)], 0.006)] = 0.95
    return _finish(img, g, textures["lateral_noise"], size)


# ----------------------------------------------------------------------------------------------- reports

_LOBES = {
    ("right", "upper"): "right upper lobe",
    ("right", "middle"): "right middle lobe",
    ("right", "lower"): "right lower lobe",
    ("left", "upper"): "left upper lobe",
    ("left", "middle"): "lingula",
    ("left", "lower"): "left lower lobe",
}
_DEVICE_TEMPLATES = {
    "endotracheal tube": (
        "An endotracheal tube is in place with the tip above the carina.",
        "The endotracheal tube terminates in satisfactory position above the carina.",
        "Endotracheal tube in standard position.",
    ),
    "central venous catheter": (
        "A right internal jugular central venous catheter terminates in the superior vena cava.",
        "Right internal jugular line with the tip in the SVC.",
        "A right-sided central venous catheter is in place, tip in the superior vena cava.",
    ),
    "enteric tube": (
        "An enteric tube courses below the diaphragm into the stomach.",
        "A nasogastric tube is seen with the tip in the stomach.",
        "The enteric tube passes below the diaphragm, tip in the stomach.",
    ),
}
_POSITIVE_TEMPLATES = {
    "Cardiomegaly": (
        "The heart is enlarged.",
        "There is cardiomegaly.",
        "The cardiac silhouette is enlarged.",
        "Moderate cardiomegaly is present.",
    ),
    "Edema": (
        "There is mild pulmonary edema.",
        "Perihilar vascular indistinctness is consistent with pulmonary edema.",
        "Findings are compatible with mild interstitial edema.",
    ),
    "Consolidation": (
        "There is consolidation in the {loc}.",
        "Focal consolidation is seen in the {loc}.",
        "A dense consolidation occupies the {loc}.",
    ),
    "Lung Opacity": (
        "There is a patchy opacity in the {loc}.",
        "Hazy opacity is noted in the {loc}.",
        "An ill-defined opacity projects over the {loc}.",
    ),
    "Lung Lesion": (
        "A {mm} mm nodule is seen in the {loc}.",
        "There is a {mm} mm pulmonary nodule in the {loc}.",
        "A rounded nodule measuring {mm} mm projects over the {loc}.",
    ),
    "Pneumothorax": (
        "There is a {side} apical pneumothorax.",
        "A {side} pneumothorax is present with a visible pleural line.",
        "{Side} pneumothorax without lung markings beyond the pleural line.",
    ),
    "Pleural Effusion": (
        "There is a {size} {side} pleural effusion.",
        "{Size} {side} pleural effusion with blunting of the costophrenic angle.",
        "Blunting of the {side} costophrenic angle is consistent with a {size} pleural effusion.",
    ),
    "Bilateral Pleural Effusion": (
        "There are {size} bilateral pleural effusions.",
        "{Size} bilateral pleural effusions with blunting of both costophrenic angles.",
        "Blunting of both costophrenic angles is consistent with {size} bilateral pleural effusions.",
    ),
}
# Each negation names exactly the observations it negates (what a CheXbert labeler reads from it).
_NEGATIONS: tuple[tuple[frozenset[str], tuple[str, ...]], ...] = (
    (
        frozenset({"Cardiomegaly"}),
        ("The heart size is normal.", "Heart size is within normal limits.", "The cardiac silhouette is normal."),
    ),
    (
        frozenset({"Enlarged Cardiomediastinum"}),
        ("The mediastinal contours are normal.", "Normal mediastinal contours."),
    ),
    (
        frozenset({"Pleural Effusion", "Pneumothorax"}),
        ("No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax."),
    ),
    (frozenset({"Pleural Effusion"}), ("No pleural effusion.", "There is no pleural effusion.")),
    (frozenset({"Pneumothorax"}), ("No pneumothorax.", "There is no pneumothorax.")),
    (frozenset({"Consolidation"}), ("No focal consolidation.", "There is no focal consolidation.")),
    (frozenset({"Edema"}), ("No pulmonary edema.", "There is no pulmonary edema.")),
    (frozenset({"Lung Lesion"}), ("No suspicious pulmonary nodules.", "No pulmonary nodule is seen.")),
    (frozenset({"Fracture"}), ("No acute fracture.", "No displaced rib fracture.")),
)
# Negated whenever absent (the core statements of a chest X-ray report); the rest only sometimes.
_ALWAYS_NEGATED = frozenset({"Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation"})


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def positive_observations(findings: Findings) -> set[str]:
    """The CheXpert observations a study's findings make positive (before "No Finding")."""
    positive = {
        "Cardiomegaly": findings.cardiomegaly,
        "Pleural Effusion": bool(findings.effusions),
        "Pneumothorax": findings.pneumothorax is not None,
        "Consolidation": findings.consolidation is not None,
        "Lung Opacity": findings.opacity is not None,
        "Lung Lesion": findings.nodule is not None,
        "Edema": findings.edema,
        "Support Devices": findings.device is not None,
    }
    return {name for name, present in positive.items() if present}


def compose_report(findings: Findings, rng: np.random.Generator) -> tuple[str, dict[str, int]]:
    """Writes the report for ``findings`` and the exact labels it implies.

    Args:
        findings: the study's findings.
        rng: chooses templates, which optional negations to state, and their order within sections.

    Returns:
        (report, labels) with labels over all CHEXPERT_14 observations.
    """
    positive = positive_observations(findings)
    labels = dict.fromkeys(CHEXPERT_14, BLANK)
    sentences: list[str] = []
    if findings.device is not None:
        sentences.append(_pick(rng, _DEVICE_TEMPLATES[findings.device]))
    fill: dict[str, dict[str, str]] = {}
    for name, lesion in (("Consolidation", findings.consolidation), ("Lung Opacity", findings.opacity)):
        if lesion is not None:
            fill[name] = {"loc": _LOBES[(lesion.side, lesion.zone)]}
    if findings.nodule is not None:
        mm = str(int(round(findings.nodule.radius * 500)))  # ~ 25 cm field of view
        fill["Lung Lesion"] = {"loc": _LOBES[(findings.nodule.side, findings.nodule.zone)], "mm": mm}
    if findings.pneumothorax is not None:
        fill["Pneumothorax"] = {"side": findings.pneumothorax[0], "Side": findings.pneumothorax[0].capitalize()}
    if findings.effusions:
        size = "small" if max(d for _, d in findings.effusions) < 0.22 else "moderate"
        fill["Pleural Effusion"] = {"side": findings.effusions[0][0], "size": size, "Size": size.capitalize()}
    order = (
        "Cardiomegaly",
        "Edema",
        "Consolidation",
        "Lung Opacity",
        "Lung Lesion",
        "Pneumothorax",
        "Pleural Effusion",
    )
    for name in order:
        if name in positive:
            bilateral = name == "Pleural Effusion" and len(findings.effusions) == 2
            templates = _POSITIVE_TEMPLATES["Bilateral Pleural Effusion" if bilateral else name]
            sentences.append(_pick(rng, templates).format(**fill.get(name, {})))
    for name in positive:
        labels[name] = POSITIVE

    negatable = [(obs, options) for obs, options in _NEGATIONS if not obs & positive]
    stated: set[str] = set()
    optional = rng.uniform(size=len(negatable))
    use_combined = bool(rng.integers(2))
    for (obs, options), draw in zip(negatable, optional, strict=True):
        if obs & stated or (len(obs) > 1 and not use_combined):
            continue
        if obs & _ALWAYS_NEGATED or draw < 0.5:
            sentences.append(_pick(rng, options))
            stated |= obs
    for name in stated:
        labels[name] = NEGATIVE
    if not positive - {"Support Devices"}:
        labels["No Finding"] = POSITIVE
        if rng.uniform() < 0.5:
            sentences.append("No acute cardiopulmonary process.")
    return " ".join(sentences), labels


# ----------------------------------------------------------------------------------------------- writing


def _study(cfg: SyntheticConfig, split: str, index: int) -> tuple[str, list[np.ndarray], dict[str, int]]:
    rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], index])
    findings = sample_findings(cfg, rng)
    geometry = sample_geometry(rng)
    textures = sample_textures(rng, cfg.image_size)
    report, labels = compose_report(findings, rng)
    images = [render_frontal(findings, geometry, cfg.image_size, textures)]
    if cfg.views == 2:
        images.append(render_lateral(findings, geometry, cfg.image_size, textures))
    return report, images, labels


def write_synthetic_dataset(out_dir: str | Path, cfg: SyntheticConfig) -> Path:
    """Writes ``images/<id>/<view>.png`` and an R2Gen-layout ``annotation.json`` under ``out_dir``.

    Image paths in the annotation are relative to ``out_dir/images`` (R2Gen's ``image_dir``), as for IU-Xray.

    Args:
        out_dir: destination folder (created if needed; existing files with the same names are overwritten).
        cfg: sizes, seed and prevalences.

    Returns:
        Path of the written ``annotation.json``.
    """
    out_dir = Path(out_dir)
    image_root = out_dir / "images"
    annotation: dict[str, list[dict[str, object]]] = {}
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)):
        records = []
        for index in range(n):
            study_id = f"synth_{split}_{index:06d}"
            report, images, labels = _study(cfg, split, index)
            (image_root / study_id).mkdir(parents=True, exist_ok=True)
            rel_paths = []
            for view, pixels in enumerate(images):
                rel = f"{study_id}/{view}.png"
                Image.fromarray(pixels).save(image_root / rel, format="PNG", optimize=False)
                rel_paths.append(rel)
            records.append(
                {"id": study_id, "report": report, "image_path": rel_paths, "split": split, "labels": labels}
            )
        annotation[split] = records
        logger.info("wrote %d %s studies to %s", n, split, image_root)
    path = out_dir / "annotation.json"
    path.write_text(json.dumps(annotation, indent=1) + "\n", encoding="utf-8")
    return path


def _parse_args(argv: list[str] | None) -> tuple[Path, SyntheticConfig]:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description="Write the synthetic chest X-ray dataset (R2Gen layout).")
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    for f in dataclasses.fields(SyntheticConfig):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f.metadata["help"],
        )
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    return out, SyntheticConfig(**args)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out, cfg = _parse_args(argv)
    write_synthetic_dataset(out, cfg)


if __name__ == "__main__":
    main()
