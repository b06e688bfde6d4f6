"""TRRG-style disease clues: predict the CheXpert-14 observations from the image, say them in the prompt.

TRRG (Wang et al. 2024) injects the diseases a classifier finds in the image into the LLM input as
text, so the report is conditioned on explicit findings. Here a small head on the pooled image
features predicts the 14 CheXpert observations; :func:`clue_texts` turns its probabilities into a
sentence for ``prompting.prompts.build_context_prompt``; :func:`clue_bce_loss` trains it on
CheXpert/CheXbert label codes (blank counts as negative, the uncertain policy is a setting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rewards.observations import CHEXPERT_14, POSITIVE, UNCERTAIN

UncertainPolicy = Literal["positive", "negative", "ignore"]

_NO_FINDING = CHEXPERT_14.index("No Finding")


@dataclass
class DiseaseClueConfig:
    """The clue head and how its predictions become prompt text."""

    enabled: bool = field(default=False, metadata={"help": "Predict disease clues and add them to the prompt."})
    hidden_dim: int = field(default=0, metadata={"help": "Hidden width of the head; 0 makes it linear."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout before the output layer."})
    threshold: float = field(
        default=0.5, metadata={"help": "Probability at which an observation is stated as a clue."}
    )
    thresholds: list[float] | None = field(default=None, metadata={
        "help": "Per-observation thresholds in CheXpert-14 order, replacing threshold (above 1: never stated); "
                "written by tune_thresholds."})
    tune_thresholds: bool = field(default=False, metadata={
        "help": "SFT with clues enabled: before each evaluation, set thresholds to those maximising the micro F1 of "
                "the head's statements on the evaluation split (CheXpert positives; the probe's rule); the export "
                "keeps them. A rare finding's probability seldom reaches 0.5, so the reports, which follow the clues, "
                "never state it."})
    uncertain_policy: UncertainPolicy = field(
        default="positive", metadata={"help": "Uncertain labels count as 'positive', 'negative', or are 'ignore'd."}
    )
    loss_weight: float = field(default=1.0, metadata={"help": "Weight of the clue BCE in the SFT loss."})
    refit: bool = field(default=False, metadata={
        "help": "SFT with clues enabled: before each evaluation (and before tune_thresholds), refit the head's output "
                "layer as an L2 logistic regression on the current encoder's features of the training studies "
                "(CheXpert positives; rlhf_rrg.probe's fit), so the head reads what a linear probe reads; the "
                "training that follows starts from it and the export keeps it. Costs one encoder pass over the "
                "training studies per evaluation."})
    gold_prompt_prob: float = field(default=0.0, metadata={
        "help": "SFT only: share of training prompts that state the study's labels instead of the head's "
                "predictions. The head is noise early in training, so an LLM trained only on its clues learns "
                "to ignore them; with true clues in some prompts it learns to follow them."})

    def __post_init__(self) -> None:
        if self.hidden_dim < 0:
            raise ValueError(f"hidden_dim must be >= 0, got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.thresholds is not None and (
            len(self.thresholds) != len(CHEXPERT_14) or not all(0.0 < t for t in self.thresholds)
        ):
            raise ValueError(f"thresholds must be {len(CHEXPERT_14)} values > 0 (CheXpert-14 order), got "
                             f"{self.thresholds}")
        if self.uncertain_policy not in ("positive", "negative", "ignore"):
            raise ValueError(
                f"uncertain_policy must be 'positive', 'negative' or 'ignore', got {self.uncertain_policy!r}"
            )
        if self.loss_weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {self.loss_weight}")
        if not 0.0 <= self.gold_prompt_prob <= 1.0:
            raise ValueError(f"gold_prompt_prob must be in [0, 1], got {self.gold_prompt_prob}")


class DiseaseClueHead(nn.Module):
    """Multi-label classifier from pooled image features to CheXpert-14 logits.

    Args:
        in_dim: Width of the pooled image features.
        hidden_dim: Width of one GELU hidden layer; 0 for a linear head.
        dropout: Dropout before the output layer.
        num_labels: Outputs, in ``CHEXPERT_14`` order.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 0, dropout: float = 0.1, num_labels: int = len(CHEXPERT_14)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)]
        if hidden_dim > 0:
            layers += [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        layers += [nn.Dropout(dropout), nn.Linear(hidden_dim or in_dim, num_labels)]
        self.net = nn.Sequential(*layers)

    def readout_inputs(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(b, in_dim or hidden_dim)``: what the output layer reads in eval mode (normalised features, through the
        hidden layer if any)."""
        return self.net[:-2](pooled)

    @property
    def readout(self) -> nn.Linear:
        """The output layer, which reads :meth:`readout_inputs`."""
        return self.net[-1]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Scores each observation.

        Args:
            pooled: ``(b, in_dim)`` pooled image features.

        Returns:
            ``(b, num_labels)`` logits; ``sigmoid`` gives probabilities.
        """
        return self.net(pooled)


def clue_targets(labels: torch.Tensor, uncertain_policy: UncertainPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary targets and a keep-mask from CheXpert label codes.

    Args:
        labels: ``(b, 14)`` codes: 0 blank, 1 positive, 2 negative, 3 uncertain.
        uncertain_policy: Uncertain as ``"positive"``, as ``"negative"``, or ``"ignore"`` (masked out).

    Returns:
        ``(targets, keep)``, both ``(b, 14)`` floats; blanks are negative targets and always kept.
    """
    valid = (labels >= 0) & (labels <= UNCERTAIN)
    if not bool(valid.all()):
        raise ValueError(f"labels must be CheXpert codes 0..3, got values {sorted(set(labels[~valid].tolist()))}")
    uncertain = labels == UNCERTAIN
    positive = labels == POSITIVE
    if uncertain_policy == "positive":
        positive = positive | uncertain
    elif uncertain_policy not in ("negative", "ignore"):
        raise ValueError(f"uncertain_policy must be 'positive', 'negative' or 'ignore', got {uncertain_policy!r}")
    keep = ~uncertain if uncertain_policy == "ignore" else torch.ones_like(uncertain)
    return positive.float(), keep.float()


def clue_bce_loss(
    logits: torch.Tensor, labels: torch.Tensor, uncertain_policy: UncertainPolicy = "positive"
) -> torch.Tensor:
    """Binary cross-entropy of the clue head, averaged over the kept (study, observation) entries.

    Args:
        logits: ``(b, 14)`` head outputs.
        labels: ``(b, 14)`` CheXpert codes (0 blank -> negative, 1 positive, 2 negative, 3 uncertain).
        uncertain_policy: How uncertain labels count, see :func:`clue_targets`.

    Returns:
        Scalar loss; 0 (still attached to ``logits``) when every entry is ignored.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must have the same shape")
    targets, keep = clue_targets(labels, uncertain_policy)
    per_entry = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return (per_entry * keep).sum() / keep.sum().clamp(min=1.0)


def clue_texts(probs: torch.Tensor, threshold: float = 0.5, prefix: str = "findings suggest: ") -> list[str]:
    """States the observations predicted present, in CheXpert order, for each study of a batch.

    "No Finding" is never listed next to a disease; when nothing else passes ``threshold`` the clue is
    "no finding". The probabilities are read in one device-to-host move.

    Args:
        probs: ``(b, 14)`` probabilities in ``CHEXPERT_14`` order.
        threshold: Minimum probability to state an observation.
        prefix: Text before the list.

    Returns:
        ``b`` texts, e.g. ``"findings suggest: cardiomegaly, pleural effusion"``.
    """
    if probs.dim() != 2 or probs.shape[1] != len(CHEXPERT_14):
        raise ValueError(f"probs must have shape (b, {len(CHEXPERT_14)}), got {tuple(probs.shape)}")
    texts = []
    for row in probs.tolist():
        found = [name.lower() for i, name in enumerate(CHEXPERT_14) if i != _NO_FINDING and row[i] >= threshold]
        texts.append(prefix + (", ".join(found) if found else "no finding"))
    return texts


def clue_text(probs: torch.Tensor, threshold: float = 0.5, prefix: str = "findings suggest: ") -> str:
    """:func:`clue_texts` for one study's ``(14,)`` probabilities."""
    if probs.shape != (len(CHEXPERT_14),):
        raise ValueError(f"probs must have shape ({len(CHEXPERT_14)},), got {tuple(probs.shape)}")
    return clue_texts(probs[None], threshold, prefix)[0]


def best_thresholds(probs: torch.Tensor, targets: torch.Tensor, grid: int = 99, passes: int = 3) -> torch.Tensor:
    """Per-column thresholds maximising the micro F1 of held-out ``probs (n, k)`` vs ``targets (n, k)``; 1.01 for a
    column best never predicted.

    Coordinate ascent from 0.5: each column in turn takes the threshold (or "never", > 1) that maximises the pooled
    F1 with the other columns fixed. Optimising each column's own F1 instead would make hopeless columns predict
    liberally and cost the micro score precision. Ties go to the threshold nearest 0.5.
    """
    never = torch.tensor([1.01], dtype=probs.dtype)
    candidates = torch.cat([torch.linspace(0.01, 0.99, grid, dtype=probs.dtype), never])
    pred = probs.unsqueeze(0) >= candidates.view(-1, 1, 1)  # (g, n, k)
    ref = targets.unsqueeze(0)
    tp, fp, fn = (pred & ref).sum(1), (pred & ~ref).sum(1), (~pred & ref).sum(1)  # (g, k) per candidate
    tie_break = -(candidates - 0.5).abs() * 1e-9
    choice = torch.full((probs.shape[1],), int((candidates - 0.5).abs().argmin()))
    columns = torch.arange(probs.shape[1])
    for _ in range(passes):
        for j in range(probs.shape[1]):
            others = columns != j
            rest_tp, rest_fp, rest_fn = (x[choice[others], columns[others]].sum() for x in (tp, fp, fn))
            hits = 2 * (rest_tp + tp[:, j])
            f1 = hits / (hits + rest_fp + fp[:, j] + rest_fn + fn[:, j]).clamp(min=1)
            choice[j] = int((f1.double() + tie_break).argmax())
    return candidates[choice]
