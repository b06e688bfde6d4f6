"""LLM settings for the report generator.

"tiny" models are built in-process from a config (random weights, vocabulary from our word-level
tokenizer) so tests and the CPU demo need no download. Any other name is a pretrained Hugging Face causal
LM (Llama, Qwen2/3, Mistral, Vicuna, ...) that must already sit in the local directory ``llm_path``
(``config.json`` + safetensors, as ``save_pretrained`` writes); its width comes from that config. The names
in ``PRETRAINED_LLMS`` are shortcuts that also pin the architecture, so a wrong path fails early.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel, Qwen2Config
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PretrainedLLM:
    """What a shortcut name's local ``config.json`` must declare."""

    model_type: str
    hidden_size: int


TINY_LLMS = {"tiny": "llama", "tiny-llama": "llama", "tiny-qwen2": "qwen2"}

# Shortcuts only: any other name loads whatever causal LM ``llm_path`` holds. A shortcut also checks that the
# folder holds that model, so a wrong path fails before training.
PRETRAINED_LLMS = {
    "llama-2-7b": PretrainedLLM("llama", 4096),
    "llama-3.2-1b": PretrainedLLM("llama", 2048),
    "qwen2.5-0.5b": PretrainedLLM("qwen2", 896),
    "qwen2.5-1.5b": PretrainedLLM("qwen2", 1536),
    "qwen2.5-7b": PretrainedLLM("qwen2", 3584),
}


def tiny_text_config(
    name: str, vocab_size: int, pad_token_id: int | None, bos_token_id: int | None, eos_token_id: int | None,
    hidden_size: int = 64, num_layers: int = 2,
) -> PretrainedConfig:
    """A small 4-head decoder config (2 layers of width 64 by default) of the family named by ``name``
    (see ``TINY_LLMS``); the MLP is twice as wide as the model.

    Raises:
        ValueError: if ``name`` is not a tiny LLM name.
    """
    if name not in TINY_LLMS:
        raise ValueError(f"unknown tiny LLM {name!r}; choose one of {sorted(TINY_LLMS)}")
    if hidden_size < 8 or hidden_size % 4 or num_layers < 1:
        raise ValueError(f"a tiny LLM needs a width divisible by its 4 heads (>= 8) and >= 1 layer, got width "
                         f"{hidden_size} and {num_layers} layers")
    config_cls = LlamaConfig if TINY_LLMS[name] == "llama" else Qwen2Config
    return config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )


def check_llm_path(name: str, path: str | Path | None) -> Path:
    """Checks that ``path`` holds a Hugging Face causal LM (of the architecture ``name`` pins, for a shortcut).

    Args:
        name: a ``PRETRAINED_LLMS`` shortcut, or any label (e.g. "llama-3.1-8b") for the LLM in ``path``.
        path: its local folder (``config.json`` + weights, as ``save_pretrained`` writes).

    Raises:
        ValueError: a tiny name, a missing directory or ``config.json``, a model type transformers cannot load
            as a causal LM, or an architecture that does not match the shortcut.
    """
    if name in TINY_LLMS:
        raise ValueError(f"LLM {name!r} is built in-process and takes no llm_path")
    if path is None:
        raise ValueError(f"LLM {name!r} needs llm_path: a local directory with its config.json and weights")
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"llm_path for {name!r} has no config.json: {config_file} does not exist")
    declared = json.loads(config_file.read_text())
    model_type = declared.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not a causal LM this transformers version "
                         "can load (AutoModelForCausalLM)")
    expected = PRETRAINED_LLMS.get(name)
    if expected is not None:
        got = (model_type, declared.get("hidden_size"))
        if got != (expected.model_type, expected.hidden_size):
            raise ValueError(
                f"{config_file} declares model_type/hidden_size {got}, but {name!r} is "
                f"({expected.model_type!r}, {expected.hidden_size}); use another llm name for other models"
            )
    return path


def load_pretrained_llm(name: str, path: str | Path | None, dtype: str) -> PreTrainedModel:
    """Loads the named pretrained causal LM from its local directory (no network access).

    Raises:
        ValueError: see ``check_llm_path``; also for an unknown ``dtype``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"llm_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    local = check_llm_path(name, path)
    logger.info("loading LLM %s from %s (%s)", name, local, dtype)
    return AutoModelForCausalLM.from_pretrained(local, dtype=DTYPES[dtype], local_files_only=True)
