"""A tiny report generator (word tokenizer + tiny encoder + 2-layer LLM + processor) for tests and the demo."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

from rlhf_rrg.models.processor import RRGProcessor
from rlhf_rrg.models.rrg import LoraSettings, RRGModelConfig, build_processor, build_rrg_model
from rlhf_rrg.models.tokenizer import build_word_tokenizer

TINY_REPORTS = (
    "the heart is normal in size . the lungs are clear .",
    "no pleural effusion or pneumothorax .",
    "mild cardiomegaly . small left pleural effusion .",
    "right lower lobe consolidation . no pneumothorax .",
    "a nodule is seen in the right upper lobe .",
    "support device in place . lungs are clear .",
)
TINY_PROMPT = "describe the findings of the chest x-ray"


@dataclass
class TinyRRG:
    """What ``tiny_rrg`` builds."""

    model: LlavaForConditionalGeneration
    processor: RRGProcessor
    tokenizer: PreTrainedTokenizerFast
    config: RRGModelConfig


def tiny_rrg(tmp_dir: str | Path, encoder_type: str = "vit", llm: str = "tiny", lora_rank: int = 4) -> TinyRRG:
    """Builds a random-init tiny report generator in about a second; the tokenizer is saved in ``tmp_dir``.

    Args:
        tmp_dir: directory for the tokenizer files.
        encoder_type: "vit", "vim" or "arm" (64 px images, 64 patch tokens).
        llm: a tiny LLM name ("tiny", "tiny-qwen2").
        lora_rank: rank used if the caller applies LoRA with the returned config.
    """
    tokenizer = build_word_tokenizer([*TINY_REPORTS, TINY_PROMPT], out_dir=Path(tmp_dir) / "tokenizer")
    config = RRGModelConfig(
        vision=f"tiny-{encoder_type}", llm=llm, lora=LoraSettings(r=lora_rank, alpha=2 * lora_rank, dropout=0.0)
    )
    model = build_rrg_model(config, tokenizer)
    return TinyRRG(model=model, processor=build_processor(model, tokenizer), tokenizer=tokenizer, config=config)
