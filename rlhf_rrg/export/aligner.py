"""The stage-2 export of a ``StudyAligner``: three things side by side, ``vision/`` (the ``RRGVisionModel`` that
SFT loads as its vision tower), ``text/`` (encoder + tokenizer, any ``AutoModel`` layout) and ``heads.safetensors``
(both projections and the logit scale, with the pooling settings in its metadata).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from safetensors.torch import load_file, safe_open, save_file
from transformers import AutoModel, AutoTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rlhf_rrg.losses.contrastive import ClipLoss
from rlhf_rrg.models.study_aligner import StudyAligner, build_study_aligner

logger = logging.getLogger(__name__)

HEADS_FILE = "heads.safetensors"
_HEAD_KEYS = ("image_proj.weight", "text_proj.weight", "loss.logit_scale")


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
