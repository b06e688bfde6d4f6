"""Generate reports with an exported report generator, for image files or a dataset split.

    python -m rlhf_rrg.generate --checkpoint runs/iu_xray/ppo/export --images a.png b.png --out reports.jsonl
    python -m rlhf_rrg.generate --checkpoint runs/iu_xray/sft/export --annotation data/iu_xray/annotation.json \
        --image-root data/iu_xray/images --split test --out reports.jsonl --batch-size 8 --num-beams 3

    python -m rlhf_rrg.generate --checkpoint runs/chexpert_plus/ppo/export \
        --annotation data/chexpert_plus/df_chexpert_plus_240401.csv --image-root data/chexpert_plus/PNG \
        --image-suffix .png --skip-empty-findings --split test --on-error skip --out reports.jsonl

Each output line is ``{"id", "images", "report"}``, written (and flushed) as soon as its batch is generated, so
an error in a late batch keeps every earlier report. ``--on-error skip`` drops studies whose record or images
are bad instead of stopping, and counts them by reason. An export trained on V views per study (IU-Xray: 2)
gets studies of V images: consecutive groups of ``--study-views`` files with ``--images``, the first V images
of each annotation record otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from rlhf_rrg.data.annotation import DataError, OnError, Split, read_chexpert_plus_csv, read_r2gen_annotation
from rlhf_rrg.data.images import load_image

logger = logging.getLogger(__name__)

# What stages/sft.py and stages/ppo.py write through rlhf_rrg.export.save.save_generator.
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


def annotation_studies(
    annotation: str | Path,
    image_root: str | Path,
    split: Split,
    views: int,
    on_error: OnError = "raise",
    image_suffix: str | None = None,
    skip_empty_findings: bool = False,
    skipped: Counter[str] | None = None,
) -> list[StudyImages]:
    """The studies of one split of an R2Gen ``annotation.json`` or a CheXpert Plus CSV, first ``views`` images each.

    Args:
        annotation, image_root, split: the annotation file, its image root and the split to read.
        views: images per study the checkpoint takes.
        on_error: "skip" drops bad records (and studies with fewer than ``views`` images) instead of raising.
        image_suffix, skip_empty_findings: CheXpert Plus CSV settings (see ``read_chexpert_plus_csv``).
        skipped: when given, incremented by the number of dropped records per reason.

    Raises:
        DataError: the annotation is unreadable, or (on_error="raise") a record is bad or has fewer than
            ``views`` images.
    """
    annotation = Path(annotation)
    if annotation.suffix.lower() == ".csv":
        read = read_chexpert_plus_csv(annotation, image_root, split, on_error=on_error,
                                      skip_empty_findings=skip_empty_findings, image_suffix=image_suffix)
    else:
        read = read_r2gen_annotation(annotation, image_root, split, on_error=on_error)
    counts = Counter(read.skipped)
    short = [s for s in read.studies if len(s.image_paths) < views]
    if short and on_error == "raise":
        raise DataError(
            f"{annotation}: {split} study {short[0].id!r} has {len(short[0].image_paths)} image(s) but the "
            f"checkpoint takes {views} views ({len(short)} such studies)"
        )
    counts["too_few_views"] += len(short)
    if skipped is not None:
        skipped.update(+counts)
    return [StudyImages(id=s.id, images=tuple(s.image_paths[:views])) for s in read.studies
            if len(s.image_paths) >= views]


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


def iter_reports(
    generator: ReportGeneratorLike,
    studies: Sequence[StudyImages],
    batch_size: int = 8,
    max_new_tokens: int = 100,
    num_beams: int = 1,
    on_error: OnError = "raise",
    skipped: Counter[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Generates one report per study, ``batch_size`` studies per ``generate`` call, yielding rows as they come.

    Args:
        generator: the loaded export.
        studies: studies of exactly ``generator.views`` images each.
        batch_size: studies per batch.
        max_new_tokens: generation budget per report.
        num_beams: beam width.
        on_error: "skip" drops a study whose images are missing or undecodable (counted as "bad_image")
            instead of raising.
        skipped: when given, incremented per dropped study.

    Yields:
        Rows ``{"id", "images" (list of str), "report"}`` in ``studies`` order.

    Raises:
        ValueError: a study does not have ``generator.views`` images, or the generator returns a wrong count.
        DataError: (on_error="raise") an image is missing or cannot be decoded.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wrong = [s for s in studies if len(s.images) != generator.views]
    if wrong:
        raise ValueError(
            f"study {wrong[0].id!r} has {len(wrong[0].images)} image(s) but the checkpoint takes "
            f"{generator.views} views per study"
        )
    done = 0
    for batch in _batches(studies, batch_size):
        loaded, pixels = [], []
        for study in batch:
            try:
                pixels.append(load_study_pixels(study, generator.image_size, generator.mean, generator.std))
            except DataError as err:
                if on_error == "raise":
                    raise
                logger.warning("skipping study %s: %s", study.id, err)
                if skipped is not None:
                    skipped["bad_image"] += 1
                continue
            loaded.append(study)
        if not loaded:
            continue
        reports = generator.generate(torch.stack(pixels), ids=[s.id for s in loaded], max_new_tokens=max_new_tokens,
                                     num_beams=num_beams)
        if len(reports) != len(loaded):
            raise ValueError(f"generator returned {len(reports)} reports for a batch of {len(loaded)} studies")
        for study, report in zip(loaded, reports, strict=True):
            yield {"id": study.id, "images": [str(p) for p in study.images], "report": report}
        done += len(batch)
        logger.info("generated %d/%d reports", done, len(studies))


def generate_for_studies(
    generator: ReportGeneratorLike,
    studies: Sequence[StudyImages],
    batch_size: int = 8,
    max_new_tokens: int = 100,
    num_beams: int = 1,
) -> list[dict[str, Any]]:
    """All rows of :func:`iter_reports` (which raises on the first bad study) as a list."""
    return list(iter_reports(generator, studies, batch_size, max_new_tokens, num_beams))


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
    parser.add_argument("--split", default="test", choices=("train", "val", "test"),
                        help="CheXpert Plus CSV: val = the official valid split, test = a patient-level 10%% of train")
    parser.add_argument("--image-suffix", help="CheXpert Plus CSV: replace the listed .jpg suffix, e.g. .png")
    parser.add_argument("--skip-empty-findings", action="store_true",
                        help="CheXpert Plus CSV: drop studies without a findings section")
    parser.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                        help="skip studies with a bad record or image (counted) instead of stopping")
    parser.add_argument("--study-views", type=int, default=None, help="images per study (default: the export's)")
    parser.add_argument("--out", required=True, help="output jsonl, written as reports are generated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the CLI; returns the written rows. Bad inputs exit with a message naming the file; reports generated
    before an error stay in ``--out``."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.annotation and not args.image_root:
        parser.error("--annotation needs --image-root (the folder its image paths are relative to)")
    if args.image_suffix is not None and not args.image_suffix.startswith("."):
        parser.error(f"--image-suffix must start with '.', got {args.image_suffix!r}")
    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    out = Path(args.out)
    try:
        generator = load_generator(args.checkpoint, args.device)
        if args.images:
            views = args.study_views if args.study_views is not None else generator.views
            if views != generator.views:
                raise ValueError(f"--study-views {views} but checkpoint {args.checkpoint} takes {generator.views}")
            studies = group_images(args.images, views)
        else:
            studies = annotation_studies(args.annotation, args.image_root, args.split, generator.views, args.on_error,
                                         args.image_suffix, args.skip_empty_findings, skipped)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as handle:
            for row in iter_reports(generator, studies, args.batch_size, args.max_new_tokens, args.num_beams,
                                    args.on_error, skipped):
                handle.write(json.dumps(row) + "\n")
                handle.flush()
                rows.append(row)
    except (CheckpointError, DataError, ValueError) as err:
        kept = f" ({len(rows)} reports generated before it are in {out})" if rows else ""
        sys.exit(f"rlhf_rrg.generate: error: {err}{kept}")
    detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
    logger.info("wrote %d reports to %s; skipped %d studies%s", len(rows), out, sum(skipped.values()),
                f" ({detail})" if detail else "")
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    main()
