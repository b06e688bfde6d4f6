"""Image<->report retrieval of a split with a stage-2 aligner: embed every study and report, then Recall@K and
the label-aware scores, each with its chance level."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_rrg.models.study_aligner import StudyAligner
from rlhf_rrg.retrieval.metrics import LABEL_K, label_match_at_k, leave_one_out_label_match, retrieval_recall_at_k

Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RetrievalEvalConfig:
    """How the aligner is scored on the validation split."""

    batch_size: int = field(default=32, metadata={"help": "Studies per evaluation batch (per process)."})
    ks: list[int] = field(default_factory=lambda: [1, 5], metadata={"help": "Recall@K cut-offs."})
    label_k: int = field(default=LABEL_K, metadata={
        "help": "Retrieved studies per query for the label-aware scores (needs CheXpert labels on the split)."})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"eval.ks must be a non-empty list of positive cut-offs, got {self.ks}")
        if self.label_k < 1:
            raise ValueError(f"eval.label_k must be >= 1, got {self.label_k}")

    @property
    def metric_names(self) -> list[str]:
        """The keys :func:`evaluate_retrieval` returns with these cut-offs (label-aware ones on labelled splits)."""
        recall = [f"{direction}_recall@{k}" for direction in ("i2t", "t2i") for k in self.ks]
        return recall + [f"{direction}_label_match@{self.label_k}" for direction in ("i2t", "i2i")]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@torch.no_grad()
def embed_pairs(
    model: StudyAligner, batches: Iterable[dict[str, Any]], gather: Gather = _identity
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeds matched studies and reports batch by batch (put the model in eval mode first).

    Args:
        model: The aligner.
        batches: ``ReportTextCollator`` batches (``pixel_values``, ``input_ids``, ``attention_mask``, ``index``).
        gather: Collects a per-process tensor from all processes, e.g. ``accelerator.gather_for_metrics``
            (which also drops the samples a sharded loader repeated to even out the last batch).

    Returns:
        ``(image_emb (n, d), text_emb (n, d), index (n,))`` on the CPU in float32, row ``i`` of each from the
        same study, ``index`` the dataset row.
    """
    device = next(model.parameters()).device
    images, texts, rows = [], [], []
    for batch in batches:
        image = model.encode_study(batch["pixel_values"].to(device))
        text = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        images.append(gather(image.float().contiguous()).cpu())
        texts.append(gather(text.float().contiguous()).cpu())
        rows.append(gather(batch["index"].to(device)).cpu())
    if not images:
        raise ValueError("retrieval evaluation got no batches")
    return torch.cat(images), torch.cat(texts), torch.cat(rows)


def evaluate_retrieval(
    model: StudyAligner,
    batches: Iterable[dict[str, Any]],
    report_of: Callable[[int], str],
    ks: Sequence[int] = (1, 5),
    gather: Gather = _identity,
    labels_of: Callable[[int], torch.Tensor | None] | None = None,
    label_k: int = LABEL_K,
) -> dict[str, float]:
    """Image->report and report->image Recall@K over a whole split, and label-aware retrieval when labelled.

    Args:
        model: The aligner (eval mode).
        batches: See :func:`embed_pairs`.
        report_of: Maps a dataset row to its report text; identical texts count as hits (see
            :func:`retrieval_recall_at_k`).
        ks: Cut-offs, each at most the split size.
        gather: See :func:`embed_pairs`.
        labels_of: Maps a dataset row to its ``(14,)`` CheXpert label codes (None when unlabelled).
        label_k: Retrieved studies per query for the label-aware scores.

    Returns:
        ``{"i2t_recall@k", "t2i_recall@k", "recall@k_chance"}`` for every ``k``; with labels on every row also
        ``i2t_label_match@{label_k}`` (image -> the split's reports) and ``i2i_label_match@{label_k}`` (image ->
        the other images, as the memory bank retrieves), each with its ``_chance`` (see :func:`label_match_at_k`).
    """
    image_emb, text_emb, rows = embed_pairs(model, batches, gather)
    metrics = retrieval_recall_at_k(image_emb, text_emb, ks, reports=[report_of(int(i)) for i in rows])
    labels = [labels_of(int(i)) for i in rows] if labels_of is not None else [None]
    if any(x is None for x in labels):
        return metrics
    labels = torch.stack(labels)
    scores = {"i2t": label_match_at_k(image_emb @ text_emb.T, labels, labels, label_k),
              "i2i": leave_one_out_label_match(image_emb, labels, label_k)}
    return metrics | {f"{direction}_{key}": value for direction, got in scores.items() for key, value in got.items()}
