"""Batching of ``ReportDataset`` items for the two-tower (image/report) models: images stacked, reports tokenised."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase


class ReportTextCollator:
    """Collates dataset items into a batch for image/report alignment.

    Args:
        tokenizer: The report encoder's tokenizer (adds its special tokens, e.g. BERT's ``[CLS]``/``[SEP]``).
        max_length: Reports are truncated to this many tokens, special tokens included.

    Calling it on ``b`` items with ``V`` views each returns ``pixel_values`` ``(b, V, 3, H, W)``, ``input_ids`` and
    ``attention_mask`` ``(b, t)`` (padded to the longest report in the batch), ``index`` ``(b,)`` (the dataset rows
    actually returned), ``labels`` ``(b, 14)`` when every item has labels (else None), and the ``id`` and
    ``report`` lists.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no pad token; reports cannot be batched")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        shapes = {tuple(item["pixel_values"].shape) for item in items}
        if len(shapes) != 1:
            raise ValueError(f"items have different image shapes {sorted(shapes)}; set data.views and image_size")
        reports = [item["report"] for item in items]
        tokens = self.tokenizer(
            reports, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        labels = [item.get("labels") for item in items]
        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
            "labels": torch.stack(labels) if all(x is not None for x in labels) else None,
            "id": [item["id"] for item in items],
            "report": reports,
        }
