"""Studies plus their retrieved context samples (images and reports), ready for the SFT/RL collate."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from rlhf_rrg.data.dataset import ReportDataset
from rlhf_rrg.retrieval.retriever import ContextRetriever


class ContextDataset(Dataset):
    """Wraps a ``ReportDataset``; item ``i`` also carries the context of study ``i``.

    Args:
        base: the studies.
        retriever: loads context images/reports; None when the prompt has no context.
        neighbours: ``(pos (n, k_pos), neg (n, k_neg))`` bank rows per study, from ``ContextRetriever.neighbours``.
    """

    def __init__(
        self,
        base: ReportDataset,
        retriever: ContextRetriever | None = None,
        neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        if (retriever is None) != (neighbours is None):
            raise ValueError("retriever and neighbours go together")
        if neighbours is not None and any(len(t) != len(base) for t in neighbours):
            raise ValueError(f"neighbours cover {len(neighbours[0])} studies, the dataset has {len(base)}")
        self.base, self.retriever, self.neighbours = base, retriever, neighbours

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.base.set_epoch(epoch, seed)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.base[index])
        if self.retriever is None:
            size = item["pixel_values"].shape[-1]
            item.update(context_pixels=torch.empty(0, 3, size, size), neg_reports=[], pos_reports=[])
        else:
            # The base may have replaced a corrupt study by the next one: use the returned study's context.
            row = item["index"]
            item.update(self.retriever.load(self.neighbours[0][row].tolist(), self.neighbours[1][row].tolist()))
        return item


def collate_context(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks images; keeps texts as lists. ``labels`` is None when any study lacks labels."""
    labels = [item["labels"] for item in items]
    return {
        "ids": [item["id"] for item in items],
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "context_pixels": torch.stack([item["context_pixels"] for item in items]),
        "reports": [item["report"] for item in items],
        "neg_reports": [item["neg_reports"] for item in items],
        "pos_reports": [item["pos_reports"] for item in items],
        "labels": None if any(lab is None for lab in labels) else torch.stack(labels),
    }
