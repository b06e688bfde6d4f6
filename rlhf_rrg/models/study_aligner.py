"""The stage-2 model over studies: an ``ImageTextAligner`` whose image side reads every view of a study.

A study has ``V`` images (IU-Xray: frontal + lateral). ``view_pooling="first"`` embeds only the first view;
``"mean"`` embeds each view, averages the unit-norm embeddings and re-normalises, so a study is one point on the
sphere either way. Everything runs inside ``forward`` so DDP sees one forward per step.

The export (``save_aligner`` / ``load_aligner``) is three things side by side: ``vision/`` (the ``RRGVisionModel``
that SFT loads as its vision tower), ``text/`` (encoder + tokenizer, any ``AutoModel`` layout) and
``heads.safetensors`` (both projections and the logit scale, with the pooling settings in its metadata).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rlhf_rrg.losses.contrastive import AlignerOutput, ClipLoss, ImageTextAligner
from rlhf_rrg.models.text_encoder import Pooling

logger = logging.getLogger(__name__)

ViewPooling = Literal["first", "mean"]
HEADS_FILE = "heads.safetensors"
_HEAD_KEYS = ("image_proj.weight", "text_proj.weight", "loss.logit_scale")


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
    loss: ClipLoss,
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
        loss: The contrastive loss (owns the logit scale).
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


def save_aligner(model: StudyAligner, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """Writes ``vision/``, ``text/`` and ``heads.safetensors`` under ``out_dir`` (see the module docstring)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    aligner = model.aligner
    aligner.vision_encoder.save_pretrained(out_dir / "vision")
    aligner.text_encoder.save_pretrained(out_dir / "text")
    tokenizer.save_pretrained(out_dir / "text")
    state = aligner.state_dict()
    heads = {key: state[key].detach().cpu().contiguous() for key in _HEAD_KEYS}
    # Exported 0-dim, as before the parameter became shape (1,) for DeepSpeed: exports read the same either way.
    heads["loss.logit_scale"] = heads["loss.logit_scale"].reshape(())
    metadata = {
        "text_pooling": aligner.text_pooling,
        "view_pooling": model.view_pooling,
        "max_logit_scale": repr(math.exp(aligner.loss.max_log_scale)),
    }
    save_file(heads, str(out_dir / HEADS_FILE), metadata=metadata)


def load_aligner(export_dir: str | Path) -> tuple[StudyAligner, PreTrainedTokenizerBase]:
    """Loads what :func:`save_aligner` wrote.

    Args:
        export_dir: Folder with ``vision/``, ``text/`` and ``heads.safetensors``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        FileNotFoundError: naming the missing part of the export.
    """
    export_dir = Path(export_dir)
    for part in ("vision/config.json", "text/config.json", HEADS_FILE):
        if not (export_dir / part).is_file():
            raise FileNotFoundError(f"aligner export {export_dir} lacks {part}")
    vision = AutoModel.from_pretrained(export_dir / "vision", local_files_only=True)
    text = AutoModel.from_pretrained(export_dir / "text", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(export_dir / "text", local_files_only=True)
    with safe_open(str(export_dir / HEADS_FILE), framework="pt") as handle:
        metadata = handle.metadata() or {}
    heads = load_file(str(export_dir / HEADS_FILE))
    missing = [key for key in _HEAD_KEYS if key not in heads] + [
        key for key in ("text_pooling", "view_pooling", "max_logit_scale") if key not in metadata
    ]
    if missing:
        raise ValueError(f"{export_dir / HEADS_FILE} lacks {missing}")
    loss = ClipLoss(max_logit_scale=float(metadata["max_logit_scale"]))
    embed_dim = heads["image_proj.weight"].shape[0]
    model = build_study_aligner(vision, text, metadata["text_pooling"], loss, embed_dim, metadata["view_pooling"])
    model.aligner.load_state_dict({**model.aligner.state_dict(), **heads})
    logger.info("loaded aligner export %s (embed_dim %d)", export_dir, embed_dim)
    return model.eval(), tokenizer
