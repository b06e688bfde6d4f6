"""The stage-2 model over studies: an ``ImageTextAligner`` whose image side reads every view of a study.

A study has ``V`` images (IU-Xray: frontal + lateral). ``view_pooling="first"`` embeds only the first view;
``"mean"`` embeds each view, averages the unit-norm embeddings and re-normalises, so a study is one point on the
sphere either way. Everything runs inside ``forward`` so DDP sees one forward per step.

Its export (``vision/``, ``text/``, ``heads.safetensors``) is written and read by :mod:`rlhf_rrg.export.aligner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from rlhf_rrg.models.image_text_aligner import AlignerOutput, ImageTextAligner
from rlhf_rrg.models.text_encoder import Pooling

ViewPooling = Literal["first", "mean"]


@dataclass
class StudyAlignerConfig:
    """Shape of the shared space, view handling and which tower trains."""

    embed_dim: int = field(default=256, metadata={"help": "Width of the shared image/report embedding space."})
    view_pooling: ViewPooling = field(
        default="first", metadata={"help": "'first': embed the first view only; 'mean': average the view embeddings."}
    )
    freeze_vision: bool = field(default=False, metadata={"help": "Keep the vision encoder fixed (LiT-style)."})
    freeze_text: bool = field(default=False, metadata={"help": "Keep the text encoder fixed."})

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"model.embed_dim must be >= 1, got {self.embed_dim}")
        if self.view_pooling not in ("first", "mean"):
            raise ValueError(f"model.view_pooling must be 'first' or 'mean', got {self.view_pooling!r}")


class StudyAligner(nn.Module):
    """Multi-view studies and their reports in one contrastive space.

    Args:
        aligner: The two towers, heads and loss.
        view_pooling: ``"first"`` or ``"mean"`` (see the module docstring).
    """

    def __init__(self, aligner: ImageTextAligner, view_pooling: ViewPooling) -> None:
        super().__init__()
        if view_pooling not in ("first", "mean"):
            raise ValueError(f"view_pooling must be 'first' or 'mean', got {view_pooling!r}")
        self.aligner = aligner
        self.view_pooling = view_pooling

    def encode_study(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Embeds studies.

        Args:
            pixel_values: ``(b, V, c, h, w)`` views of each study.

        Returns:
            ``(b, embed_dim)`` unit-norm study embeddings.
        """
        if pixel_values.dim() != 5:
            raise ValueError(f"expected pixel_values (b, V, c, h, w), got {tuple(pixel_values.shape)}")
        if self.view_pooling == "first":
            return self.aligner.encode_image(pixel_values[:, 0])
        b, v = pixel_values.shape[:2]
        per_view = self.aligner.encode_image(pixel_values.flatten(0, 1)).view(b, v, -1)
        return F.normalize(per_view.mean(dim=1), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeds tokenised reports: ``(b, t)`` ids and mask -> ``(b, embed_dim)`` unit-norm embeddings."""
        return self.aligner.encode_text(input_ids, attention_mask)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> AlignerOutput:
        """Contrastive loss of matched studies and reports.

        Args:
            pixel_values: ``(b, V, c, h, w)``.
            input_ids: ``(b, t)``.
            attention_mask: ``(b, t)``.
            labels: ``(b, k)`` 0/1 findings, for the loss's label-aware targets.

        Returns:
            :class:`AlignerOutput`: scalar loss and both ``(b, embed_dim)`` embeddings.
        """
        image_embeds = self.encode_study(pixel_values)
        text_embeds = self.encode_text(input_ids, attention_mask)
        return AlignerOutput(self.aligner.loss(image_embeds, text_embeds, labels), image_embeds, text_embeds)


def build_study_aligner(
    vision_encoder: PreTrainedModel,
    text_encoder: PreTrainedModel,
    text_pooling: Pooling,
    loss: nn.Module,
    embed_dim: int,
    view_pooling: ViewPooling,
    freeze_vision: bool = False,
    freeze_text: bool = False,
) -> StudyAligner:
    """Assembles the stage-2 model with fresh projection heads.

    The text encoder's own pooler head (BERT's ``pooler``) is never used, since reports are pooled from
    ``last_hidden_state``; it is frozen so it neither sits in the optimizer nor trips DDP's unused-parameter check.

    Args:
        vision_encoder: An encoder with ``config.hidden_size`` returning ``pooler_output`` ``(b, hidden)``.
        text_encoder: A Hugging Face encoder returning ``last_hidden_state`` ``(b, t, hidden)``.
        text_pooling: ``"cls"`` or ``"mean"``.
        loss: The contrastive loss (owns the logit scale), e.g. :class:`rlhf_rrg.losses.contrastive.ClipLoss`.
        embed_dim: Width of the shared space.
        view_pooling: ``"first"`` or ``"mean"``.
        freeze_vision: Turn off gradients of the vision encoder.
        freeze_text: Turn off gradients of the text encoder.

    Returns:
        The model; heads and logit scale always train.
    """
    aligner = ImageTextAligner(
        vision_encoder,
        text_encoder,
        vision_dim=vision_encoder.config.hidden_size,
        text_dim=text_encoder.config.hidden_size,
        embed_dim=embed_dim,
        text_pooling=text_pooling,
        loss=loss,
    )
    vision_encoder.requires_grad_(not freeze_vision)
    text_encoder.requires_grad_(not freeze_text)
    pooler = getattr(text_encoder, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)
    return StudyAligner(aligner, view_pooling)
