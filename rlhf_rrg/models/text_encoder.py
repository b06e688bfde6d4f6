"""The report encoder for image/report alignment: any local Hugging Face encoder plus a pooling rule.

Real runs point ``path`` at a downloaded BERT-family checkpoint (e.g. CXR-BERT, BioClinicalBERT);
tests build one with :func:`tiny_text_encoder`, which writes the same on-disk layout, so both go
through the same ``AutoModel`` / ``AutoTokenizer`` code path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Pooling = Literal["cls", "mean"]

# BERT's special tokens, in the order the original vocab files list them.
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class TextEncoderConfig:
    """Where the report encoder lives and how its token states become one vector."""

    path: str | None = field(
        default=None,
        metadata={"help": "Local directory of a Hugging Face encoder (config + weights + tokenizer); null builds a "
                          "tiny random one from the training reports (demo and tests)."},
    )
    pooling: Pooling = field(
        default="cls", metadata={"help": "'cls': first token state; 'mean': mean over real tokens."}
    )
    max_length: int = field(default=128, metadata={"help": "Reports are truncated to this many tokens."})

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {self.max_length}")


def build_text_encoder(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads an encoder and its tokenizer from a local directory.

    Args:
        path: Directory holding ``config.json``, the weights and the tokenizer files.

    Returns:
        ``(model, tokenizer)``; the model returns ``last_hidden_state`` of shape ``(b, t, hidden)``.

    Raises:
        FileNotFoundError: when ``path`` is not a directory with a ``config.json``.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder path {path} has no config.json (TextEncoderConfig.path)")
    model = AutoModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    logger.info("loaded text encoder %s (%s, hidden %d)", path, type(model).__name__, model.config.hidden_size)
    return model, tokenizer


def pool_hidden_states(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Reduces token states to one vector per sequence.

    Args:
        hidden: Token states ``(b, t, d)``.
        mask: ``(b, t)``, nonzero on real tokens; every row needs at least one.
        pooling: ``"cls"`` takes position 0 (BERT's ``[CLS]``); ``"mean"`` averages the real tokens.

    Returns:
        ``(b, d)`` pooled states.
    """
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden (b, t, d) and mask (b, t), got {tuple(hidden.shape)} and {tuple(mask.shape)}"
        )
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    counts = weights.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("mean pooling needs at least one real token per row; a mask row is all zeros")
    return (hidden * weights).sum(dim=1) / counts


def _words(texts: Iterable[str]) -> list[str]:
    """Lowercased words and single punctuation marks, the units BERT's basic tokenizer splits into."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            seen.setdefault(word, None)
    return list(seen)


def tiny_text_encoder(
    vocab_texts: Iterable[str],
    out_dir: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Writes a tiny random-weight BERT (with pooler) and a WordPiece tokenizer in the real checkpoint layout.

    The vocabulary is every word and punctuation mark in ``vocab_texts`` (lowercased) plus BERT's
    special tokens, so those texts tokenize without ``[UNK]``.

    Args:
        vocab_texts: Texts whose words form the vocabulary.
        out_dir: Directory to create; gets ``config.json``, ``model.safetensors``, ``vocab.txt``,
            ``tokenizer.json`` and ``tokenizer_config.json``.
        hidden_size: Width of the model.
        num_layers: Transformer layers.
        num_heads: Attention heads (must divide ``hidden_size``).
        seed: Seed for the random weights.

    Returns:
        ``out_dir`` as a ``Path``, ready for :func:`build_text_encoder`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = [*_SPECIAL_TOKENS, *(w for w in _words(vocab_texts) if w not in _SPECIAL_TOKENS)]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(out_dir)
    # Real BERT checkpoints ship vocab.txt next to tokenizer.json; slow-tokenizer readers need it.
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir
