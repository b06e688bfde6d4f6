"""SERPENT-VLM's self-refining loss (Kapadnis et al., ClinicalNLP 2024), in two formulations.

The paper adds to the causal LM loss a term that relates two summaries of a study, the pooled image
representation and a pooled representation of the generated report: ``lambda_report * L_report +
lambda_refine * L_refine``.

- ``formulation: pooled`` (ours): the masked mean of the projected image tokens the LLM receives is pulled
  towards the masked mean of the LLM's last hidden states over the report tokens (which have attended to the
  image), by mean squared error or ``1 - cos``. A distance, minimised when the summaries agree.
- ``formulation: serpent`` (the authors' code, ``manavkapadnis/SERPENT-VLM``, ``models/SR3GVLM.py``): the report
  side is made of the output distribution, not the hidden states: a gumbel-softmax (tau 0.07, soft) of the logits
  at the positions that predict report tokens, times the input-embedding matrix, gives soft token embeddings;
  these are averaged with weights from the last layer's attention (per query position, its mean attention onto
  the report positions, averaged over heads). The term is ``exp(sum over the batch of cos(report, image))``,
  weighted 0.1 beside 0.05 on the LM loss. Minimising ``exp(sum cos)`` lowers the cosine: this term pushes the
  report away from the image rather than pulling them together, which is why ``pooled`` stays the default
  outside reproductions. Here padding positions carry no weight (the reference pads to a fixed length and lets
  padded keys into the mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from rlhf_rrg.models.text_encoder import pool_hidden_states

Similarity = Literal["mse", "cosine"]
Formulation = Literal["pooled", "serpent"]


@dataclass
class SelfRefineConfig:
    """Formulation, weights and distance of the self-refining term (the SERPENT-VLM reproduction: formulation
    serpent, weight 0.1, report_weight 0.05)."""

    weight: float = field(default=0.0, metadata={"help": "lambda_refine; 0 turns the term off."})
    formulation: Formulation = field(default="pooled", metadata={
        "help": "'pooled': distance between pooled image tokens and pooled report hidden states (ours); "
                "'serpent': exp(sum cos) of the pooled image and attention-pooled gumbel-softmax report "
                "embeddings, as the authors' code computes it (see rlhf_rrg/losses/self_refine.py)"})
    similarity: Similarity = field(
        default="mse", metadata={"help": "pooled formulation: 'mse' of the pooled vectors or 'cosine' (1 - cos)."}
    )
    report_weight: float = field(default=1.0, metadata={
        "help": "lambda_report, the weight of the LM loss when the term is on (SERPENT-VLM: 0.05)"})
    tau: float = field(default=0.07, metadata={"help": "serpent formulation: gumbel-softmax temperature"})

    def __post_init__(self) -> None:
        if self.weight < 0 or self.report_weight <= 0:
            raise ValueError(f"weight must be >= 0 and report_weight > 0, got {self.weight}, {self.report_weight}")
        if self.similarity not in ("mse", "cosine"):
            raise ValueError(f"similarity must be 'mse' or 'cosine', got {self.similarity!r}")
        if self.formulation not in ("pooled", "serpent"):
            raise ValueError(f"formulation must be 'pooled' or 'serpent', got {self.formulation!r}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


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


def serpent_refining_loss(
    logits: torch.Tensor,
    attention: torch.Tensor,
    input_embeddings: torch.Tensor,
    report_positions: torch.Tensor,
    image: torch.Tensor,
    tau: float = 0.07,
) -> torch.Tensor:
    """SERPENT-VLM's refining term as its code computes it: ``exp(sum_b cos(report_b, image_b))``.

    Args:
        logits: ``(b, t, V)`` LM logits.
        attention: ``(b, h, t, t)`` last-layer attention probabilities.
        input_embeddings: ``(V, d)`` the LLM's input-embedding matrix.
        report_positions: ``(b, t)`` bool, True where the logits predict a report token.
        image: ``(b, d)`` pooled image representation in the LLM's embedding space.
        tau: Gumbel-softmax temperature.

    Returns:
        Scalar; gradients reach the logits, the attention, the embeddings and the image.
    """
    if report_positions.dim() != 2 or not report_positions.any(1).all():
        raise ValueError("report_positions must be (b, t) with at least one report position per row")
    soft = F.gumbel_softmax(logits.float(), tau=tau, hard=False, dim=-1)
    embeddings = soft @ input_embeddings.float()  # (b, t, d) soft token embeddings
    mask = report_positions.float()
    # Each query position's mean attention onto the report positions, zero off them; averaged over heads.
    block = attention.float() * mask[:, None, :, None] * mask[:, None, None, :]
    weights = (block.sum(-1) / mask.sum(-1)[:, None, None]).mean(1)  # (b, t)
    report = torch.einsum("bt,btd->bd", weights, embeddings)
    return torch.exp(F.cosine_similarity(report, image.float(), dim=-1).sum())
