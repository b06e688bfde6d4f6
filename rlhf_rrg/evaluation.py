"""Validation during training: generate reports for a fixed subset and score them with ``rewards``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from rewards.evaluate import METRICS, evaluate_reports
from rewards.observations import CHEXPERT_14
from rlhf_rrg.prompting.generator import ReportGenerator
from rlhf_rrg.retrieval.context_dataset import ContextDataset, collate_context
from rlhf_rrg.retrieval.retriever import dataset_neighbours


@dataclass
class EvalConfig:
    split: Literal["val", "test"] = field(default="val", metadata={"help": "split scored during training"})
    max_samples: int = field(default=0, metadata={"help": "first N studies of the split; 0 = all"})
    batch_size: int = field(default=16, metadata={"help": "generation batch size"})
    max_new_tokens: int = field(default=100, metadata={"help": "generation budget per report"})
    num_beams: int = field(default=1, metadata={"help": "1 = greedy"})
    metrics: list[str] = field(default_factory=lambda: ["bleu", "rouge_l", "cider", "ce"],
                               metadata={"help": f"subset of {list(METRICS)}"})

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"eval.metrics: unknown {unknown}; valid: {list(METRICS)}")
        if self.max_samples < 0 or self.batch_size < 1 or self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError("eval.max_samples must be >= 0 and batch_size, max_new_tokens, num_beams >= 1")


def with_context(generator: ReportGenerator, base: Dataset, exclude_self: bool) -> ContextDataset:
    """Studies with their context from the generator's memory bank (a training study never retrieves itself)."""
    if generator.retriever is None:
        return ContextDataset(base)
    neighbours = dataset_neighbours(generator.retriever, generator.retrieval_encoder, ContextDataset(base),
                                    collate_context, exclude_self)
    return ContextDataset(base, generator.retriever, neighbours)


def eval_subset(dataset: Dataset, cfg: EvalConfig) -> Dataset:
    return Subset(dataset, range(min(cfg.max_samples, len(dataset)))) if cfg.max_samples else dataset


@torch.no_grad()
def generate_and_score(
    generator: ReportGenerator, dataset: Dataset, cfg: EvalConfig, clues: torch.Tensor | None = None
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy/beam reports for every study of ``dataset`` (a ``ContextDataset``), scored against the references.

    ``clues``: ``(n, 14)`` bool, in ``dataset`` order, that the clue sentences state instead of the clue head's.

    Returns:
        (flat scores such as ``bleu_4``, ``ce/micro_f1_14``; rows ``{id, reference, prediction}``).
    """
    if clues is not None and clues.shape != (len(dataset), len(CHEXPERT_14)):
        raise ValueError(f"clues must have shape ({len(dataset)}, {len(CHEXPERT_14)}), got {tuple(clues.shape)}")
    was_training = generator.training
    generator.eval()
    rows: list[dict[str, Any]] = []
    for batch in DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collate_context):
        told = None if clues is None else clues[len(rows):len(rows) + len(batch["ids"])]
        predictions = generator.generate_batch(batch, cfg.max_new_tokens, cfg.num_beams, clues=told)
        rows += [{"id": i, "reference": r, "prediction": p}
                 for i, r, p in zip(batch["ids"], batch["reports"], predictions, strict=True)]
    generator.train(was_training)
    result = evaluate_reports([r["prediction"] for r in rows], [r["reference"] for r in rows], cfg.metrics)
    return dict(result["scores"]), rows


def most_common_report(reports: Iterable[str]) -> str:
    """The most frequent report (the first seen among equally frequent ones): the majority baseline's output."""
    return Counter(reports).most_common(1)[0][0]


def majority_report_scores(train_reports: list[str], references: list[str], metrics: list[str]) -> dict[str, float]:
    """Scores of the trivial baseline that writes the most common training report for every study."""
    majority = most_common_report(train_reports)
    return dict(evaluate_reports([majority] * len(references), references, metrics)["scores"])
