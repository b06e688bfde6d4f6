"""Context samples for each study: embed with the vision encoder, look up the memory bank, load their images.

This ties ``MemoryBank`` (which rows) to the training studies (which image files), so the same object serves SFT
(neighbours of training studies, the study itself excluded), validation, RL rollouts and inference from an export.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rlhf_rrg.config import load_config, save_config
from rlhf_rrg.data.images import _resize as resize_grayscale
from rlhf_rrg.data.images import load_image, read_grayscale
from rlhf_rrg.models.rrg import build_vision_model
from rlhf_rrg.retrieval.context import ContextConfig
from rlhf_rrg.retrieval.memory_bank import MemoryBank, fixed_context

_IMAGES_FILE = "bank_images.json"
_CONTEXT_FILE = "context.yaml"
_CONTEXT_IMAGES_DIR = "context_images"
_ENCODER_DIR = "retrieval_encoder"


@torch.no_grad()
def embed_studies(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pooled encoder features of each study, averaged over its views.

    Args:
        vision_model: an encoder returning ``pooler_output`` (``RRGVisionModel``).
        pixel_values: ``(b, V, 3, H, W)``.

    Returns:
        ``(b, d)`` float32 embeddings on the CPU.
    """
    b, v = pixel_values.shape[:2]
    param = next(vision_model.parameters())
    pooled = vision_model(pixel_values.flatten(0, 1).to(param.device, param.dtype)).pooler_output
    return pooled.reshape(b, v, -1).mean(1).float().cpu()


class ContextRetriever:
    """Finds and loads the R2GenCSR context samples of studies.

    Args:
        cfg: retrieval settings (mode, k_pos, k_neg, seed, report use).
        bank: training-set memory bank.
        bank_images: per bank row, the image paths of that study (the first view is the context image).
        image_size: side the context images are resized to.
        mean: normalisation mean.
        std: normalisation std.
        encoder: the frozen encoder that built the bank, kept when the generator's own vision tower trains on
            (:meth:`keep_encoder`); None: queries are embedded with the generator's tower.
    """

    def __init__(
        self,
        cfg: ContextConfig,
        bank: MemoryBank,
        bank_images: Sequence[Sequence[str]],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        encoder: nn.Module | None = None,
    ) -> None:
        if cfg.mode == "none":
            raise ValueError("ContextRetriever needs context.mode 'retrieved' or 'fixed'")
        if len(bank_images) != len(bank):
            raise ValueError(f"{len(bank_images)} image lists for a memory bank of {len(bank)} studies")
        self.cfg, self.bank = cfg, bank
        self.bank_images = [list(paths) for paths in bank_images]
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self._fixed = fixed_context(bank, cfg.k_pos, cfg.k_neg, cfg.seed) if cfg.mode == "fixed" else None
        self.encoder = encoder

    def keep_encoder(self, vision_model: nn.Module) -> None:
        """Keeps a frozen copy of ``vision_model`` (the encoder that built the bank, before a stage tunes it) to
        embed queries, unless the retriever already has its own.

        A stage computes its training prompts' neighbours once, with the encoder as it starts. Queried with the
        tuned encoder instead, an export would give its LLM context it never trained on (on IU X-ray reports: val
        CE-F1-13 0.38 against the 0.49 its training-time evaluation measured).
        """
        if self.encoder is None:
            self.encoder = copy.deepcopy(vision_model).eval().requires_grad_(False)

    @property
    def num_context_images(self) -> int:
        return self.cfg.k_pos + self.cfg.k_neg

    @classmethod
    def build(
        cls,
        cfg: ContextConfig,
        vision_model: nn.Module,
        batches: Iterable[Mapping[str, Any]],
        image_paths: Sequence[Sequence[str]],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> ContextRetriever:
        """Encodes the training set (batches in dataset order, matching ``image_paths``) into a bank."""
        bank = MemoryBank.build(lambda px: embed_studies(vision_model, px), batches)
        return cls(cfg, bank, image_paths, image_size, mean, std)

    def neighbours(
        self, emb: torch.Tensor, ids: Sequence[str], exclude_self: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context rows of each query: ``(pos (b, k_pos), neg (b, k_neg))`` bank indices.

        Args:
            emb: ``(b, d)`` query embeddings from :func:`embed_studies`.
            ids: the queries' study ids.
            exclude_self: never return a query's own study (training-set queries).
        """
        if self._fixed is not None:
            pos, neg = self._fixed
            return pos.expand(len(ids), -1), neg.expand(len(ids), -1)
        exclude = [[i] for i in ids] if exclude_self else None
        return self.bank.query(emb, self.cfg.k_pos, self.cfg.k_neg, exclude_ids=exclude)

    def load(self, pos_rows: Sequence[int], neg_rows: Sequence[int]) -> dict[str, Any]:
        """Images ``(k_neg + k_pos, 3, H, W)`` (negatives first, the prompt's order) and reports of one query."""
        rows = list(neg_rows) + list(pos_rows)
        pixels = [load_image(self.bank_images[r][0], self.image_size, self.mean, self.std) for r in rows]
        return {
            "context_pixels": torch.stack(pixels) if pixels else torch.empty(0, 3, self.image_size, self.image_size),
            "neg_reports": self._reports(neg_rows),
            "pos_reports": self._reports(pos_rows),
        }

    def _reports(self, rows: Sequence[int]) -> list[str]:
        if self.bank.reports is not None:
            return [self.bank.reports[r] for r in rows]
        if self.cfg.use_reports:
            raise ValueError("context.use_reports needs the training reports, but this memory bank was saved "
                             "without them")
        # Without use_reports the prompt only counts the context samples, never shows their text.
        return [""] * len(rows)

    def save(self, directory: str | Path) -> None:
        """Writes the bank (reports only with ``use_reports``), a copy of each study's context image and the
        retriever's own encoder where it keeps one (``retrieval_encoder/``).

        The copies (``context_images/<row>.png``, the first view resized to ``image_size``, 16-bit grayscale) are
        named relative to ``directory`` in ``bank_images.json``, so a copied export works without the training data.
        """
        directory = Path(directory)
        self.bank.save(directory, include_reports=self.cfg.use_reports)
        save_config(self.cfg, directory / _CONTEXT_FILE)
        (directory / _CONTEXT_IMAGES_DIR).mkdir(exist_ok=True)
        bank_images = []
        for row, paths in enumerate(self.bank_images):
            relative = f"{_CONTEXT_IMAGES_DIR}/{row:07d}.png"
            if Path(paths[0]).resolve() != (directory / relative).resolve():
                save_context_image(paths[0], directory / relative, self.image_size)
            bank_images.append([relative])
        meta = {"bank_images": bank_images, "image_size": self.image_size, "mean": self.mean, "std": self.std}
        (directory / _IMAGES_FILE).write_text(json.dumps(meta))
        if self.encoder is not None:
            self.encoder.save_pretrained(directory / _ENCODER_DIR, safe_serialization=True)

    @classmethod
    def load_dir(cls, directory: str | Path) -> ContextRetriever:
        """Reads :meth:`save`'s files; relative image paths are taken from ``directory`` (older exports: absolute)."""
        directory = Path(directory)
        meta_path = directory / _IMAGES_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"context retriever file missing: {meta_path}")
        meta = json.loads(meta_path.read_text())
        cfg = load_config(ContextConfig, directory / _CONTEXT_FILE)
        bank_images = [[str(directory / p) for p in paths] for paths in meta["bank_images"]]
        encoder = None
        if (directory / _ENCODER_DIR / "config.json").is_file():
            encoder = build_vision_model(str(directory / _ENCODER_DIR)).eval().requires_grad_(False)
        return cls(cfg, MemoryBank.load(directory), bank_images, meta["image_size"], meta["mean"], meta["std"],
                   encoder)


def save_context_image(source: str | Path, target: Path, image_size: int) -> None:
    """``source`` as the pipeline sees it before normalisation (grayscale, resized), as a 16-bit PNG.

    ``load_image`` reads it back to within 1/65535 of the original's pixels (its resize to the same size is a copy).
    """
    array = resize_grayscale(read_grayscale(source), image_size)
    Image.fromarray(np.round(array * 65535.0).astype(np.uint16)).save(target, format="PNG")


def dataset_neighbours(
    retriever: ContextRetriever,
    vision_model: nn.Module,
    dataset: Dataset,
    collate_fn: Any,
    exclude_self: bool,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context rows of every study of ``dataset``, in dataset order (what ``ContextDataset`` takes).

    Args:
        retriever: the bank to search.
        vision_model: the encoder that built the bank.
        dataset: yields studies with ``pixel_values`` and ``id`` (a ``ContextDataset`` without context).
        collate_fn: batches its items into ``{"ids", "pixel_values" (b, V, 3, H, W)}``.
        exclude_self: never return a study's own bank row (training-set studies).
        batch_size: studies encoded per forward.

    Returns:
        ``(pos (n, k_pos), neg (n, k_neg))`` bank indices.
    """
    emb, ids = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn):
        emb.append(embed_studies(vision_model, batch["pixel_values"]))
        ids += batch["ids"]
    return retriever.neighbours(torch.cat(emb), ids, exclude_self=exclude_self)
