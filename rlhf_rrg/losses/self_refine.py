"""SERPENT-VLM's self-refining loss (Kapadnis et al., ClinicalNLP 2024).

Alongside the causal LM loss, SERPENT-VLM pulls together two summaries of a study: the pooled image
representation (the projected image tokens the LLM receives) and the contextual representation of the
report (the LLM's last hidden states over the report tokens, which have attended to the image). The
total loss is ``lambda_report * L_report + lambda_refine * L_refine``. Both summaries are masked means
here and the default distance is the mean squared error; ``"cosine"`` (one minus cosine similarity)
is the scale-free alternative. The public paper text does not pin the pooling/distance down further
and no reference code is released, so this reading is an assumption worth an ablation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from rlhf_rrg.models.text_encoder import pool_hidden_states

Similarity = Literal["mse", "cosine"]


@dataclass
class SelfRefineConfig:
    """Weight and distance of the self-refining term."""

    weight: float = field(default=0.0, metadata={"help": "lambda_refine; 0 turns the term off."})
    similarity: Similarity = field(
        default="mse", metadata={"help": "'mse' of the pooled vectors or 'cosine' (1 - cos)."}
    )

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.similarity not in ("mse", "cosine"):
            raise ValueError(f"similarity must be 'mse' or 'cosine', got {self.similarity!r}")


def self_refining_loss(
    image_tokens: torch.Tensor,
    image_mask: torch.Tensor,
    report_hidden: torch.Tensor,
    report_mask: torch.Tensor,
    similarity: Similarity = "mse",
) -> torch.Tensor:
    """Distance between the pooled image tokens and the pooled report hidden states.

    Args:
        image_tokens: ``(b, n_img, d)`` projected image features as fed to the LLM.
        image_mask: ``(b, n_img)``, nonzero on real image tokens.
        report_hidden: ``(b, t, d)`` last-layer LLM hidden states.
        report_mask: ``(b, t)``, nonzero on report tokens only (not prompt, image or padding positions).
        similarity: ``"mse"``: mean over batch and features of the squared difference; ``"cosine"``:
            mean over the batch of ``1 - cos``.

    Returns:
        Scalar loss; gradients reach both the image tokens and the report states.
    """
    if image_tokens.shape[-1] != report_hidden.shape[-1]:
        raise ValueError(
            f"image tokens (d={image_tokens.shape[-1]}) and report states "
            f"(d={report_hidden.shape[-1]}) differ in width"
        )
    if image_tokens.shape[0] != report_hidden.shape[0]:
        raise ValueError(
            f"batch sizes differ: {image_tokens.shape[0]} image rows, {report_hidden.shape[0]} report rows"
        )
    image = pool_hidden_states(image_tokens, image_mask, "mean")
    report = pool_hidden_states(report_hidden, report_mask, "mean")
    if similarity == "mse":
        return F.mse_loss(image.float(), report.float())
    if similarity == "cosine":
        return (1.0 - F.cosine_similarity(image.float(), report.float(), dim=-1)).mean()
    raise ValueError(f"similarity must be 'mse' or 'cosine', got {similarity!r}")
