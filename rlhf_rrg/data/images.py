"""Chest X-ray image loading and train-time augmentation (PIL + torch, no torchvision dependency).

Images of any common encoding (8/16-bit grayscale, RGB, palette) become a float tensor ``(3, H, W)``:
the grayscale intensity in [0, 1], resized to ``image_size`` x ``image_size``, replicated to three
channels (encoders pretrained on RGB expect three) and normalised per channel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rlhf_rrg.data.annotation import DataError

# R2Gen and most report generators normalise with ImageNet statistics.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    """Train-time augmentation ranges. There is deliberately no horizontal flip (see :func:`augment`)."""

    enabled: bool = field(default=True, metadata={"help": "Apply augmentation to training images."})
    min_crop_scale: float = field(
        default=0.85, metadata={"help": "Smallest random crop, as a fraction of the image area (1.0 = no crop)."}
    )
    max_rotation_deg: float = field(default=5.0, metadata={"help": "Rotation drawn from +-this many degrees."})
    brightness: float = field(default=0.1, metadata={"help": "Additive brightness jitter, +-this (intensity units)."})
    contrast: float = field(default=0.1, metadata={"help": "Multiplicative contrast jitter, 1 +- this."})

    def __post_init__(self) -> None:
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"min_crop_scale must be in (0, 1], got {self.min_crop_scale}")
        if not 0.0 <= self.max_rotation_deg <= 45.0:
            raise ValueError(f"max_rotation_deg must be in [0, 45], got {self.max_rotation_deg}")
        if not 0.0 <= self.brightness < 1.0:
            raise ValueError(f"brightness must be in [0, 1), got {self.brightness}")
        if not 0.0 <= self.contrast < 1.0:
            raise ValueError(f"contrast must be in [0, 1), got {self.contrast}")


def read_grayscale(path: str | Path) -> np.ndarray:
    """Decodes an image file to a float32 grayscale array in [0, 1].

    Args:
        path: a PNG/JPG (or any PIL-readable) file; 8- or 16-bit, grayscale, RGB or palette.

    Returns:
        Array of shape (H, W), float32.

    Raises:
        DataError: the file is missing, truncated, not an image, fails to decode, or has more than PIL's
            ``Image.MAX_IMAGE_PIXELS`` pixels (a decompression bomb); the message names the path.
    """
    path = Path(path)
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: refused as a possible decompression bomb ({err})", "decompression_bomb") from err
    except Exception as err:
        raise DataError(f"{path}: cannot decode image ({type(err).__name__}: {err})", "corrupt_image") from err
    # PIL only warns between 1x and 2x its pixel limit; no chest X-ray is that large, so refuse it. Checked here, not
    # by turning the warning into an error: warning filters are process-wide, and datasets decode in threads.
    pixels = img.width * img.height
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        img.close()
        raise DataError(f"{path}: refused as a possible decompression bomb ({pixels} pixels exceed "
                        f"PIL's limit of {Image.MAX_IMAGE_PIXELS})", "decompression_bomb")
    try:
        with img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit PNGs decode as "I;16" or "I"; scale by the 16-bit range, not the image maximum,
                # so intensities stay comparable across images.
                array = np.asarray(img, dtype=np.float32) / 65535.0
            elif img.mode == "F":
                array = np.asarray(img, dtype=np.float32)
            else:
                array = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except Exception as err:  # PIL plugins raise many types (OSError, SyntaxError, struct.error, zlib.error...)
        raise DataError(f"{path}: cannot decode image ({type(err).__name__}: {err})", "corrupt_image") from err
    return np.clip(array, 0.0, 1.0)


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    return np.array(Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _normalize(array: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    image = torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(0).expand(3, -1, -1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (image - mean_t) / std_t


def augment(array: np.ndarray, cfg: AugmentConfig, generator: torch.Generator | None = None) -> np.ndarray:
    """Random resized crop, small rotation and brightness/contrast jitter of a grayscale image.

    No horizontal flip: left and right are anatomically distinct on a chest X-ray (the heart sits on the
    patient's left, reports say "left pleural effusion"), so a flip would make images contradict reports.

    Args:
        array: grayscale image (H, W) in [0, 1].
        cfg: augmentation ranges.
        generator: torch RNG to draw from (None: the global one, which DataLoader seeds per worker).

    Returns:
        The augmented image, same shape, clipped to [0, 1].
    """
    h, w = array.shape
    draws = torch.rand(6, generator=generator).tolist()
    scale = cfg.min_crop_scale + (1.0 - cfg.min_crop_scale) * draws[0]
    side = math.sqrt(scale)  # keep the aspect ratio: anatomy proportions (e.g. heart/thorax ratio) matter
    ch, cw = max(1, round(h * side)), max(1, round(w * side))
    top, left = round((h - ch) * draws[1]), round((w - cw) * draws[2])
    img = Image.fromarray(array).crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BILINEAR)
    angle = cfg.max_rotation_deg * (2.0 * draws[3] - 1.0)
    # Fill the corners with the image's own edge intensity rather than black, which would look like air.
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=float(np.median(array[0])))
    out = np.asarray(img, dtype=np.float32)
    contrast = 1.0 + cfg.contrast * (2.0 * draws[4] - 1.0)
    brightness = cfg.brightness * (2.0 * draws[5] - 1.0)
    mean = float(out.mean())
    return np.clip((out - mean) * contrast + mean + brightness, 0.0, 1.0)


def load_image(
    path: str | Path,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augmentation: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Loads an image file as a normalised 3-channel tensor.

    Args:
        path: image file.
        image_size: output height and width.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel std divided by.
        augmentation: train-time augmentation, or None (evaluation).
        generator: RNG for the augmentation.

    Returns:
        Tensor of shape (3, image_size, image_size), float32.

    Raises:
        DataError: unreadable or corrupt file (the message names the path).
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {list(mean)} and {list(std)}")
    array = read_grayscale(path)
    if augmentation is not None and augmentation.enabled:
        array = augment(array, augmentation, generator)
    return _normalize(_resize(array, image_size), mean, std)
