"""Tiny random causal LMs of real families saved as a pretrained-LLM folder (``config.json``, safetensors,
tokenizer), so "any Hugging Face LLM by path" is tested without downloading one."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from rlhf_rrg.models.tokenizer import build_word_tokenizer

# Families whose decoders differ in what matters here (GQA, q/k norms, sliding windows, tied embeddings).
TINY_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral")


def write_tiny_llm(folder: str | Path, family: str, texts: Iterable[str], hidden_size: int = 48) -> Path:
    """Saves a random 2-layer causal LM of ``family`` with a word tokenizer over ``texts`` into ``folder``.

    Args:
        folder: output folder (created); it then loads with ``AutoModelForCausalLM``/``AutoTokenizer``.
        family: a transformers ``model_type`` (e.g. one of ``TINY_FAMILIES``).
        texts: the vocabulary source (reports and prompt words).
        hidden_size: model width (multiple of 4: 4 heads).

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    tokenizer = build_word_tokenizer(texts, out_dir=folder)
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=family != "llama",
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder
