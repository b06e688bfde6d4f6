"""The report-generation dataset: studies from any supported layout -> image tensors + cleaned reports."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from rewards.cleaning import CLEANERS, DEFAULT_CLEANER, DEFAULT_MAX_WORDS, r2gen_kept_words, truncate_words
from rewards.observations import BLANK, CHEXPERT_14
from rlhf_rrg.data.annotation import (
    DataError,
    Split,
    Study,
    StudySplit,
    read_chexpert_plus_csv,
    read_r2gen_annotation,
)
from rlhf_rrg.data.images import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, load_image, read_grayscale

logger = logging.getLogger(__name__)

DatasetName = Literal["synthetic", "iu_xray", "mimic_cxr", "chexpert_plus"]


@dataclass
class DataConfig:
    """Which dataset to read and how to turn its studies into model inputs."""

    dataset: DatasetName = field(
        default="synthetic", metadata={"help": "synthetic | iu_xray | mimic_cxr | chexpert_plus."}
    )
    annotation_path: Path = field(
        default=Path("data/synthetic/annotation.json"),
        metadata={"help": "R2Gen annotation.json, or df_chexpert_plus_240401.csv for chexpert_plus."},
    )
    image_root: Path = field(
        default=Path("data/synthetic/images"), metadata={"help": "Folder the annotation's image paths are under."}
    )
    image_size: int = field(default=224, metadata={"help": "Square side images are resized to."})
    max_words: int | None = field(
        default=None,
        metadata={"help": "Report length cut, counted like R2Gen's max_seq_length (BOS included, so 60 keeps 59 "
                          "words) unless truncation='words'; None = 60 for iu_xray, 100 otherwise."},
    )
    truncation: Literal["r2gen", "words"] = field(
        default="r2gen",
        metadata={"help": "r2gen: keep max_words - 1 words as the published protocol; words: keep max_words "
                          "words (this project's behaviour before the fix, one word more than the papers)."},
    )
    views: int = field(
        default=1, metadata={"help": "Images returned per study (IU-Xray: 2); studies with fewer are errors."}
    )
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "raise on bad records/images, or skip them (named and counted). skip "
                                           "decodes every image once when the dataset is built and drops the studies "
                                           "that fail, so no study id is replaced or repeated during training."}
    )
    cleaner: Literal["auto", "iu_xray", "mimic_cxr", "none"] = field(
        default="auto", metadata={"help": "Report cleaner; auto = R2Gen's choice for the dataset."}
    )
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN, metadata={"help": "Per-channel normalisation mean."})
    std: tuple[float, ...] = field(default=IMAGENET_STD, metadata={"help": "Per-channel normalisation std."})
    skip_empty_findings: bool = field(
        default=False, metadata={"help": "CheXpert Plus CSV: drop studies without a findings section."}
    )
    image_suffix: str | None = field(
        default=None, metadata={"help": "CheXpert Plus CSV: replace the listed image suffix, e.g. '.png'."}
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={"help": "Train-time augmentation."})

    def __post_init__(self) -> None:
        self.annotation_path, self.image_root = Path(self.annotation_path), Path(self.image_root)
        if self.dataset not in DEFAULT_MAX_WORDS:
            raise ValueError(f"dataset must be one of {sorted(DEFAULT_MAX_WORDS)}, got {self.dataset!r}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.truncation not in ("r2gen", "words"):
            raise ValueError(f"truncation must be 'r2gen' or 'words', got {self.truncation!r}")
        least = 2 if self.truncation == "r2gen" else 1  # r2gen: BOS takes one slot
        if self.max_words is not None and self.max_words < least:
            raise ValueError(f"max_words must be >= {least} with truncation={self.truncation!r} (or None), "
                             f"got {self.max_words}")
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.cleaner != "auto" and self.cleaner not in CLEANERS:
            raise ValueError(f"cleaner must be 'auto' or one of {sorted(CLEANERS)}, got {self.cleaner!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need 3 values (std > 0), got mean={self.mean} std={self.std}")
        if self.image_suffix is not None and not self.image_suffix.startswith("."):
            raise ValueError(f"image_suffix must start with '.', got {self.image_suffix!r}")

    @property
    def resolved_max_words(self) -> int:
        return self.max_words if self.max_words is not None else DEFAULT_MAX_WORDS[self.dataset]

    @property
    def kept_words(self) -> int:
        """Words a long report keeps after cleaning."""
        if self.truncation == "r2gen":
            return r2gen_kept_words(self.resolved_max_words)
        return self.resolved_max_words

    @property
    def resolved_cleaner(self) -> str:
        return DEFAULT_CLEANER[self.dataset] if self.cleaner == "auto" else self.cleaner


def labels_tensor(labels: dict[str, int] | None) -> torch.Tensor | None:
    """CheXpert label dict -> LongTensor (14,) in CHEXPERT_14 order (missing observations are BLANK)."""
    if labels is None:
        return None
    return torch.tensor([labels.get(name, BLANK) for name in CHEXPERT_14], dtype=torch.long)


class ReportDataset(Dataset):
    """Studies as model inputs.

    Items are dicts: ``id`` (str), ``pixel_values`` (V, 3, H, W) float, ``report`` (cleaned, truncated str),
    ``labels`` (LongTensor (14,) in CHEXPERT_14 order, or None), ``index`` (int: the item actually returned,
    which differs from the requested one when a corrupt image was skipped).
    """

    def __init__(
        self,
        studies: Sequence[Study],
        image_size: int,
        views: int = 1,
        max_words: int = 100,
        clean: Callable[[str], str] = CLEANERS["mimic_cxr"],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augmentation: AugmentConfig | None = None,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> None:
        """Builds the dataset.

        Args:
            studies: the records (see :mod:`rlhf_rrg.data.annotation`); each needs at least ``views`` images.
            image_size: output image side.
            views: images per item; the first ``views`` of each study are used.
            max_words: words kept after cleaning (``DataConfig.kept_words``).
            clean: report cleaner.
            mean: normalisation mean (3 values).
            std: normalisation std (3 values).
            augmentation: train-time augmentation, or None.
            on_error: "raise" on a corrupt image, or "skip" to the next valid study (counted in
                ``skipped_indices``; per process, so DataLoader workers keep their own counts).
        """
        short = [s.id for s in studies if len(s.image_paths) < views]
        if short:
            raise DataError(f"study {short[0]!r} has fewer than views={views} images ({len(short)} such studies)")
        if not studies:
            raise DataError("no studies to build a dataset from")
        self.studies = list(studies)
        self.image_size = image_size
        self.views = views
        self.max_words = max_words
        self.clean = clean
        self.mean, self.std = tuple(mean), tuple(std)
        self.augmentation = augmentation
        self.on_error = on_error
        self.skipped_indices: set[int] = set()
        self.seed = 0
        self.epoch = 0

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Augmentation draws depend only on (seed, epoch, index), so a resumed run sees the same images
        whatever the global RNG did in between (DataLoader iterators draw from it when created)."""
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    def __len__(self) -> int:
        return len(self.studies)

    def report(self, index: int) -> str:
        """The cleaned, truncated report of study ``index`` (no image decoding)."""
        return truncate_words(self.clean(self.studies[index].report), self.max_words)

    def _load(self, index: int) -> dict[str, Any]:
        study = self.studies[index]
        generator = None
        if self.augmentation is not None:
            generator = torch.Generator().manual_seed(((self.seed * 100_003 + self.epoch) * 1_000_003 + index) % 2**63)
        pixels = [
            load_image(path, self.image_size, self.mean, self.std, self.augmentation, generator)
            for path in study.image_paths[: self.views]
        ]
        return {
            "id": study.id,
            "pixel_values": torch.stack(pixels),
            "report": self.report(index),
            "labels": labels_tensor(study.labels),
            "index": index,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} studies")
        for offset in range(len(self)):
            current = (index + offset) % len(self)
            try:
                return self._load(current)
            except DataError as err:
                if self.on_error == "raise":
                    raise DataError(
                        f"study {self.studies[current].id!r} (index {current}): {err}", err.reason
                    ) from err
                if current not in self.skipped_indices:
                    self.skipped_indices.add(current)
                    logger.warning(
                        "skipping study index %d: %s (%d skipped so far)", current, err, len(self.skipped_indices)
                    )
        raise DataError(f"every one of the {len(self)} studies failed to load")


def read_studies(cfg: DataConfig, split: Split) -> StudySplit:
    """Reads one split's studies for ``cfg.dataset`` (JSON annotation, or the CheXpert Plus CSV)."""
    if cfg.dataset == "chexpert_plus" and cfg.annotation_path.suffix.lower() == ".csv":
        return read_chexpert_plus_csv(
            cfg.annotation_path,
            cfg.image_root,
            split,
            on_error=cfg.on_error,
            skip_empty_findings=cfg.skip_empty_findings,
            image_suffix=cfg.image_suffix,
        )
    return read_r2gen_annotation(cfg.annotation_path, cfg.image_root, split, on_error=cfg.on_error)


def _decode_problem(study: Study, views: int) -> str | None:
    try:
        for path in study.image_paths[:views]:
            read_grayscale(path)
    except DataError as err:
        return str(err)
    return None


def readable_studies(studies: Sequence[Study], views: int, source: str) -> list[Study]:
    """The studies whose first ``views`` images all decode; each dropped one is logged with its file and reason.

    Decoding runs in threads (PIL releases the GIL while decoding).

    Raises:
        DataError: no study is readable.
    """
    with ThreadPoolExecutor() as pool:
        problems = list(pool.map(lambda study: _decode_problem(study, views), studies))
    for study, problem in zip(studies, problems, strict=True):
        if problem is not None:
            logger.warning("%s: skipping study %r: %s", source, study.id, problem)
    kept = [study for study, problem in zip(studies, problems, strict=True) if problem is None]
    if studies and not kept:
        raise DataError(f"{source}: none of the {len(studies)} studies has readable images")
    if len(kept) < len(studies):
        logger.warning("%s: skipped %d of %d studies with unreadable images", source, len(studies) - len(kept),
                       len(studies))
    return kept


def build_dataset(cfg: DataConfig, split: Split, train: bool) -> ReportDataset:
    """Builds the dataset of one split.

    Args:
        cfg: data settings.
        split: "train", "val" or "test".
        train: enables augmentation (when ``cfg.augment.enabled``).

    Returns:
        The dataset. Studies with fewer than ``cfg.views`` images, or with images that do not decode, raise (at
        build or load time), or are dropped here with on_error="skip".
    """
    studies = read_studies(cfg, split).studies
    short = [s for s in studies if len(s.image_paths) < cfg.views]
    if short and cfg.on_error == "raise":
        raise DataError(
            f"{cfg.annotation_path}: {split} study {short[0].id!r} has {len(short[0].image_paths)} image(s), "
            f"field 'image_path' needs views={cfg.views}"
        )
    if short:
        logger.warning(
            "%s [%s]: skipped %d studies with fewer than %d images", cfg.annotation_path, split, len(short), cfg.views
        )
        studies = [s for s in studies if len(s.image_paths) >= cfg.views]
    if cfg.on_error == "skip":
        studies = readable_studies(studies, cfg.views, f"{cfg.annotation_path} [{split}]")
    return ReportDataset(
        studies,
        image_size=cfg.image_size,
        views=cfg.views,
        max_words=cfg.kept_words,
        clean=CLEANERS[cfg.resolved_cleaner],
        mean=cfg.mean,
        std=cfg.std,
        augmentation=cfg.augment if train and cfg.augment.enabled else None,
        on_error=cfg.on_error,
    )
