"""Generate reports with an exported report generator, for image files or a dataset split.

    python -m rlhf_rrg.generate --checkpoint runs/iu_xray/ppo/export --images a.png b.png --out reports.jsonl
    python -m rlhf_rrg.generate --checkpoint runs/iu_xray/sft/export --annotation data/iu_xray/annotation.json \
        --image-root data/iu_xray/images --split test --out reports.jsonl --batch-size 8 --num-beams 3

Each output line is ``{"id", "images", "report"}``. An export trained on V views per study (IU-Xray: 2) gets
studies of V images: consecutive groups of ``--study-views`` files with ``--images``, the first V images of
each annotation record otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from rlhf_rrg.data.annotation import DataError, Split, read_chexpert_plus_csv, read_r2gen_annotation
from rlhf_rrg.data.images import load_image

logger = logging.getLogger(__name__)

# What stages/sft.py and stages/ppo.py write through ReportGenerator.save.
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
EXPORT_PROMPTING = "prompting/prompting.yaml"


class CheckpointError(FileNotFoundError):
    """The checkpoint path is not a report-generator export."""


class ReportGeneratorLike(Protocol):
    """What :class:`rlhf_rrg.inference.ReportGenerator` offers and this module uses."""

    image_size: int
    views: int
    mean: Sequence[float]
    std: Sequence[float]

    def generate(
        self,
        pixel_values: torch.Tensor,
        ids: list[str] | None = None,
        max_new_tokens: int = 100,
        num_beams: int = 1,
    ) -> list[str]: ...


@dataclass(frozen=True)
class StudyImages:
    """One study to report on: its id and image files (frontal first)."""

    id: str
    images: tuple[Path, ...]


def check_export(path: str | Path) -> Path:
    """Checks that ``path`` holds a report-generator export.

    Raises:
        CheckpointError: naming the path and the files an export must contain.
    """
    path = Path(path)
    expected = f"{EXPORT_CONFIG}, {EXPORT_PROMPTING} and one of {', '.join(EXPORT_WEIGHTS)}"
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} does not exist or is not a directory; expected a report-generator export "
            f"(<run_root>/sft/export or <run_root>/ppo/export) containing {expected}"
        )
    missing = [name for name in (EXPORT_CONFIG, EXPORT_PROMPTING) if not (path / name).is_file()]
    if not any((path / name).is_file() for name in EXPORT_WEIGHTS):
        missing.append(" or ".join(EXPORT_WEIGHTS))
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a report-generator export: missing {', '.join(missing)}")
    return path


def load_generator(path: str | Path, device: str = "cpu") -> ReportGeneratorLike:
    """Loads the export at ``path`` as a :class:`rlhf_rrg.inference.ReportGenerator` on ``device``."""
    from rlhf_rrg.inference import ReportGenerator

    return ReportGenerator.from_export(check_export(path), device=device)


def group_images(paths: Sequence[str | Path], study_views: int) -> list[StudyImages]:
    """Splits image files into consecutive studies of ``study_views`` images; a study's id is its first image.

    Raises:
        ValueError: the number of images is not a multiple of ``study_views``.
    """
    if study_views < 1:
        raise ValueError(f"--study-views must be >= 1, got {study_views}")
    if not paths or len(paths) % study_views:
        raise ValueError(f"got {len(paths)} images, which is not a positive multiple of --study-views {study_views}")
    groups = [tuple(Path(p) for p in paths[i : i + study_views]) for i in range(0, len(paths), study_views)]
    return [StudyImages(id=str(group[0]), images=group) for group in groups]


def annotation_studies(annotation: str | Path, image_root: str | Path, split: Split, views: int) -> list[StudyImages]:
    """The studies of one split of an R2Gen ``annotation.json`` or a CheXpert Plus CSV, first ``views`` images each.

    Raises:
        DataError: the annotation is unreadable, or a study has fewer than ``views`` images.
    """
    annotation = Path(annotation)
    if annotation.suffix.lower() == ".csv":
        studies = read_chexpert_plus_csv(annotation, image_root, split).studies
    else:
        studies = read_r2gen_annotation(annotation, image_root, split).studies
    short = [s for s in studies if len(s.image_paths) < views]
    if short:
        raise DataError(
            f"{annotation}: {split} study {short[0].id!r} has {len(short[0].image_paths)} image(s) but the "
            f"checkpoint takes {views} views ({len(short)} such studies)"
        )
    return [StudyImages(id=s.id, images=tuple(s.image_paths[:views])) for s in studies]


def load_study_pixels(
    study: StudyImages, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Decodes a study's images.

    Returns:
        Tensor ``(V, 3, image_size, image_size)``, normalised with ``mean``/``std``.

    Raises:
        DataError: an image is missing or cannot be decoded (the message names the file).
    """
    return torch.stack([load_image(path, image_size, mean, std, None) for path in study.images])


def _batches(items: Sequence[StudyImages], size: int) -> Iterable[Sequence[StudyImages]]:
    return (items[i : i + size] for i in range(0, len(items), size))


def generate_for_studies(
    generator: ReportGeneratorLike,
    studies: Sequence[StudyImages],
    batch_size: int = 8,
    max_new_tokens: int = 100,
    num_beams: int = 1,
) -> list[dict[str, Any]]:
    """Generates one report per study, ``batch_size`` studies per ``generate`` call.

    Args:
        generator: the loaded export.
        studies: studies of exactly ``generator.views`` images each.
        batch_size: studies per batch.
        max_new_tokens: generation budget per report.
        num_beams: beam width.

    Returns:
        Rows ``{"id", "images" (list of str), "report"}`` in ``studies`` order.

    Raises:
        ValueError: a study does not have ``generator.views`` images, or the generator returns a wrong count.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wrong = [s for s in studies if len(s.images) != generator.views]
    if wrong:
        raise ValueError(
            f"study {wrong[0].id!r} has {len(wrong[0].images)} image(s) but the checkpoint takes "
            f"{generator.views} views per study"
        )
    rows: list[dict[str, Any]] = []
    for batch in _batches(studies, batch_size):
        size, mean, std = generator.image_size, generator.mean, generator.std
        pixels = torch.stack([load_study_pixels(s, size, mean, std) for s in batch])
        ids = [s.id for s in batch]
        reports = generator.generate(pixels, ids=ids, max_new_tokens=max_new_tokens, num_beams=num_beams)
        if len(reports) != len(batch):
            raise ValueError(f"generator returned {len(reports)} reports for a batch of {len(batch)} studies")
        rows += [
            {"id": s.id, "images": [str(p) for p in s.images], "report": r}
            for s, r in zip(batch, reports, strict=True)
        ]
        logger.info("generated %d/%d reports", len(rows), len(studies))
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Writes one JSON object per line (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m rlhf_rrg.generate``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="report-generator export directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files; consecutive groups of --study-views form a study")
    source.add_argument("--annotation", help="R2Gen annotation.json or CheXpert Plus CSV")
    parser.add_argument("--image-root", help="folder the annotation's image paths are relative to")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--study-views", type=int, default=None, help="images per study (default: the export's)")
    parser.add_argument("--out", required=True, help="output jsonl")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the CLI; returns the written rows. Bad inputs exit with a message naming the file."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.annotation and not args.image_root:
        parser.error("--annotation needs --image-root (the folder its image paths are relative to)")
    try:
        generator = load_generator(args.checkpoint, args.device)
        if args.images:
            views = args.study_views if args.study_views is not None else generator.views
            if views != generator.views:
                raise ValueError(f"--study-views {views} but checkpoint {args.checkpoint} takes {generator.views}")
            studies = group_images(args.images, views)
        else:
            studies = annotation_studies(args.annotation, args.image_root, args.split, generator.views)
        rows = generate_for_studies(generator, studies, args.batch_size, args.max_new_tokens, args.num_beams)
    except (CheckpointError, DataError, ValueError) as err:
        sys.exit(f"rlhf_rrg.generate: error: {err}")
    write_jsonl(rows, args.out)
    logger.info("wrote %d reports to %s", len(rows), args.out)
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    main()
