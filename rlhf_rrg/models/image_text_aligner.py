"""The two-tower image/report model of stage 2: both encoders with linear heads into one L2-normalised space.

Its contrastive loss (:class:`rlhf_rrg.losses.contrastive.ClipLoss`) is passed in and kept as the ``loss``
submodule, since it owns the learnable logit scale that trains and is saved with the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from rlhf_rrg.models.text_encoder import Pooling, pool_hidden_states


@dataclass
class AlignerOutput:
    """What :class:`ImageTextAligner` returns."""

    loss: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


class ImageTextAligner(nn.Module):
    """Two towers with linear heads into a shared, L2-normalised space, trained with a contrastive loss it holds.

    Args:
        vision_encoder: Any module whose output has ``pooler_output`` of shape ``(b, vision_dim)``
            (a ``BaseModelOutputWithPooling``).
        text_encoder: A Hugging Face encoder returning ``last_hidden_state`` ``(b, t, text_dim)``.
        vision_dim: Width of the vision encoder's pooled output.
        text_dim: Hidden size of the text encoder.
        embed_dim: Width of the shared space.
        text_pooling: How report token states become one vector (``"cls"`` or ``"mean"``).
        loss: The contrastive loss, ``loss(image_embeds, text_embeds, labels) -> scalar`` (e.g.
            :class:`rlhf_rrg.losses.contrastive.ClipLoss`); it owns the learnable logit scale, saved with the heads.
    """

    def __init__(
        self,
        vision_encoder: nn.Module,
        text_encoder: PreTrainedModel,
        vision_dim: int,
        text_dim: int,
        embed_dim: int,
        text_pooling: Pooling,
        loss: nn.Module,
    ) -> None:
        super().__init__()
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        # No bias, as in CLIP: the heads only rotate/scale into the shared space before normalising.
        self.image_proj = nn.Linear(vision_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        self.text_pooling = text_pooling
        self.loss = loss

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Embeds images.

        Args:
            pixel_values: ``(b, c, h, w)`` images, as the vision encoder expects them.

        Returns:
            ``(b, embed_dim)`` unit-norm embeddings.
        """
        pooled = self.vision_encoder(pixel_values).pooler_output
        if pooled is None:
            raise ValueError(f"{type(self.vision_encoder).__name__} returned no pooler_output; the aligner needs one")
        return F.normalize(self.image_proj(pooled), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeds tokenised reports.

        Args:
            input_ids: ``(b, t)`` token ids.
            attention_mask: ``(b, t)``, 1 on real tokens.

        Returns:
            ``(b, embed_dim)`` unit-norm embeddings.
        """
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool_hidden_states(hidden, attention_mask, self.text_pooling)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> AlignerOutput:
        """Embeds a batch of matched image/report pairs and computes the contrastive loss.

        Args:
            pixel_values: ``(b, c, h, w)``.
            input_ids: ``(b, t)``.
            attention_mask: ``(b, t)``.
            labels: ``(b, k)`` 0/1 findings, for the loss's label-aware targets.

        Returns:
            :class:`AlignerOutput` with the scalar loss and both ``(b, embed_dim)`` embeddings.
        """
        image_embeds = self.encode_image(pixel_values)
        text_embeds = self.encode_text(input_ids, attention_mask)
        return AlignerOutput(self.loss(image_embeds, text_embeds, labels), image_embeds, text_embeds)
