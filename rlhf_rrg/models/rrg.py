"""The report generator: our vision encoder + LLaVA projector + a HF causal LM (+ LoRA), as a stock LLaVA.

The assembled model is a plain ``LlavaForConditionalGeneration`` whose ``vision_config`` is our
``RRGVisionConfig`` (registered with ``AutoConfig``/``AutoModel`` by ``rlhf_rrg.models.vision``), so it
saves and loads through ``AutoModelForImageTextToText`` and TRL's GRPO/RLOO trainers train it as they
would any LLaVA. Image features: hidden states of ``vision_feature_layer``, cls dropped under the
"default" strategy, through the two-layer projector, scattered over the ``<image>`` placeholders.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_rrg.models.llm_configs import DTYPES, PRETRAINED_LLMS, TINY_LLMS, load_pretrained_llm, tiny_text_config
from rlhf_rrg.models.processor import ImageInput, RRGProcessor
from rlhf_rrg.models.tokenizer import IMAGE_TOKEN, add_image_token
from rlhf_rrg.models.vision import VISION_CONFIGS, tiny_vision_config
from rlhf_rrg.runroot import verify_export

logger = logging.getLogger(__name__)

# Matches rlhf_rrg.data.images' default normalisation, which PIL inputs must reproduce.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_VISIONS = {"tiny-vit": "vit", "tiny-vim": "vim", "tiny-arm": "arm"}


@dataclass
class LoraSettings:
    """LoRA on the language model's attention/MLP projections."""

    enabled: bool = field(default=True, metadata={"help": "Wrap the LLM projections with LoRA adapters."})
    r: int = field(default=16, metadata={"help": "LoRA rank."})
    alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] = field(
        default_factory=lambda: list(LORA_DEFAULT_TARGETS),
        metadata={"help": "Leaf module names inside the language model to adapt (Llama/Qwen2 naming)."},
    )

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module")


@dataclass
class RRGModelConfig:
    """How to assemble the report generator."""

    vision: str = field(
        default="tiny-vit",
        metadata={"help": "'tiny-vit' | 'tiny-vim' | 'tiny-arm', or a directory with an exported vision encoder."},
    )
    llm: str = field(default="tiny", metadata={
        "help": f"{list(TINY_LLMS)} (built in-process), or any name for the Hugging Face causal LM in llm_path; "
                f"the shortcuts {list(PRETRAINED_LLMS)} also check its architecture."})
    llm_path: str | None = field(
        default=None, metadata={"help": "Local directory with the pretrained LLM (required unless llm is tiny)."}
    )
    llm_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Weight dtype of the assembled model."}
    )
    projector_hidden_act: str = field(default="gelu", metadata={"help": "Activation between the projector layers."})
    vision_feature_layer: int = field(
        default=-1, metadata={"help": "Encoder hidden-state index fed to the projector (-1: last)."}
    )
    vision_feature_select_strategy: Literal["default", "full"] = field(
        default="default", metadata={"help": "'default' drops the cls token, 'full' keeps it."}
    )
    tiny_hidden_size: int = field(default=64, metadata={"help": "Width of a tiny LLM (4 heads, MLP twice as wide)."})
    tiny_layers: int = field(default=2, metadata={"help": "Decoder layers of a tiny LLM."})
    vocab_min_freq: int = field(default=1, metadata={
        "help": "A tiny LLM's word vocabulary keeps training-report words seen this often (R2Gen: 3 for IU X-ray); "
                "rarer words become <unk>."})
    freeze_vision: bool = field(default=True, metadata={"help": "Keep the vision encoder's weights fixed."})
    vision_lr_scale: float = field(default=1.0, metadata={
        "help": "Multiplier of optim.lr for a trainable vision encoder: below 1, a pretrained encoder adapts "
                "without overwriting what stages 1-2 taught it (discriminative fine-tuning)."})
    image_token: str = field(default=IMAGE_TOKEN, metadata={"help": "Placeholder string for image features."})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings."})

    def __post_init__(self) -> None:
        if self.vocab_min_freq < 1:
            raise ValueError(f"model.vocab_min_freq must be >= 1, got {self.vocab_min_freq}")
        if self.vision_lr_scale <= 0:
            raise ValueError(f"model.vision_lr_scale must be > 0, got {self.vision_lr_scale}")
        if self.llm not in TINY_LLMS and self.llm_path is None:
            raise ValueError(f"llm_path is required for the pretrained LLM {self.llm!r}")
        if self.llm_dtype not in DTYPES:
            raise ValueError(f"llm_dtype must be one of {sorted(DTYPES)}, got {self.llm_dtype!r}")
        names = sorted(TINY_VISIONS) + sorted(VISION_CONFIGS)
        if self.vision not in names and not (Path(self.vision) / "config.json").is_file():
            raise ValueError(f"vision {self.vision!r} is neither one of {names} nor a directory with config.json")


def num_image_tokens(vision_config: PretrainedConfig, vision_feature_select_strategy: str) -> int:
    """Projected features per image: one per patch, plus the cls token under the "full" strategy."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + (1 if vision_feature_select_strategy == "full" else 0)


def build_vision_model(vision: str) -> PreTrainedModel:
    """A random-init encoder (a ``TINY_VISIONS`` or ``VISION_CONFIGS`` name) or the one exported in dir ``vision``."""
    if vision in TINY_VISIONS:
        return AutoModel.from_config(tiny_vision_config(TINY_VISIONS[vision]))
    if vision in VISION_CONFIGS:
        return AutoModel.from_config(VISION_CONFIGS[vision]())
    logger.info("loading vision encoder from %s", vision)
    return AutoModel.from_pretrained(vision, local_files_only=True)


def build_rrg_model(
    cfg: RRGModelConfig, tokenizer: PreTrainedTokenizerBase, vision_model: PreTrainedModel | None = None
) -> LlavaForConditionalGeneration:
    """Assembles the LLaVA report generator; adds the image token to ``tokenizer`` if absent.

    Args:
        cfg: assembly settings.
        tokenizer: the LLM's tokenizer (our word-level one for tiny LLMs); modified in place.
        vision_model: an already built/pretrained encoder; overrides ``cfg.vision``.

    Returns:
        The model (fp32 or ``cfg.llm_dtype``), vision encoder frozen if ``cfg.freeze_vision``, with
        ``config.image_token_id`` set and the image token suppressed in its generation config.
    """
    image_token_id = add_image_token(tokenizer, cfg.image_token)
    vision_model = vision_model if vision_model is not None else build_vision_model(cfg.vision)
    llm = None
    if cfg.llm in TINY_LLMS:
        text_config = tiny_text_config(
            cfg.llm, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            cfg.tiny_hidden_size, cfg.tiny_layers,
        )
    else:
        llm = load_pretrained_llm(cfg.llm, cfg.llm_path, cfg.llm_dtype)
        text_config = llm.config
    config = LlavaConfig(
        vision_config=vision_model.config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=num_image_tokens(vision_model.config, cfg.vision_feature_select_strategy),
        projector_hidden_act=cfg.projector_hidden_act,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision_model
    if llm is not None:
        # Graft the pretrained decoder instead of copying weights: no second copy of a 7B model.
        model.model.language_model = llm.model
        model.lm_head = llm.lm_head
    if len(tokenizer) != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.to(DTYPES[cfg.llm_dtype])
    generation = model.generation_config
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    # A sampled placeholder would be replaced by image features on the next forward: never emit it.
    generation.suppress_tokens = [image_token_id]
    model.model.vision_tower.requires_grad_(not cfg.freeze_vision)
    return model


def build_processor(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> RRGProcessor:
    """The processor matching ``model``'s image size, placeholder count and image token."""
    config = model.config
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
    return RRGProcessor(
        tokenizer,
        image_size=config.vision_config.image_size,
        num_image_tokens=num_image_tokens(config.vision_config, config.vision_feature_select_strategy),
        image_mean=image_mean,
        image_std=image_std,
        image_token=image_token,
    )


def lora_target_pattern(target_modules: Sequence[str]) -> str:
    """PEFT full-match regex selecting ``target_modules`` inside the language model only."""
    names = "|".join(re.escape(name) for name in target_modules)
    return rf"model\.language_model\..*\.({names})"


def apply_lora(model: LlavaForConditionalGeneration, cfg: RRGModelConfig) -> PeftModel:
    """Wraps the LLM projections with LoRA; the projector (and an unfrozen encoder) train fully.

    Those fully trained modules go through PEFT's ``modules_to_save`` so an adapter save carries them.

    Raises:
        ValueError: if ``cfg.lora.enabled`` is false or no module matches ``cfg.lora.target_modules``.
    """
    if not cfg.lora.enabled:
        raise ValueError("apply_lora called with lora.enabled = false")
    pattern = lora_target_pattern(cfg.lora.target_modules)
    if not any(re.fullmatch(pattern, name) for name, _ in model.named_modules()):
        raise ValueError(f"lora.target_modules {cfg.lora.target_modules} match no module of the language model")
    modules_to_save = ["multi_modal_projector"] + ([] if cfg.freeze_vision else ["vision_tower"])
    peft_config = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=pattern,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def load_rrg(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[LlavaForConditionalGeneration, RRGProcessor]:
    """Loads a ``rlhf_rrg.export.save.save_rrg`` export with ``AutoModelForImageTextToText`` and its processor.

    Raises:
        rlhf_rrg.runroot.DamagedExportError: a file of a complete-marked export differs from its marker.
        RuntimeError: if any weight is missing, unexpected or of mismatched shape (never loads partially).
    """
    verify_export(Path(path))
    model, info = AutoModelForImageTextToText.from_pretrained(
        path, dtype="auto", local_files_only=True, output_loading_info=True
    )
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if problems:
        logger.error("loading %s: %s", path, problems)
        raise RuntimeError(f"{path}: checkpoint does not match the model: {problems}")
    processor = RRGProcessor.from_pretrained(path)
    return model.to(device), processor


def to_model_device(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Moves a processor batch to ``model``'s device; images also take its embedding dtype (bf16 runs)."""
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    return {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def generate_response_ids(
    model: LlavaForConditionalGeneration | PeftModel, processor: RRGProcessor, inputs: dict[str, torch.Tensor],
    **generate_kwargs: Any,
) -> torch.Tensor:
    """``model.generate`` on a left-padded batch with the image token suppressed; returns only the new tokens.

    Args:
        model: the report generator (plain or LoRA-wrapped).
        processor: its processor.
        inputs: ``input_ids``, ``attention_mask``, ``pixel_values`` on the model's device.
        **generate_kwargs: e.g. ``max_new_tokens``, ``num_beams``, ``do_sample``, ``temperature``.

    Returns:
        ``(B, new_tokens)`` token ids (padding after each row's EOS).
    """
    tokenizer = processor.tokenizer
    output = model.generate(
        **inputs,
        suppress_tokens=[processor.image_token_id],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **generate_kwargs,
    )
    return output[:, inputs["input_ids"].size(1) :]


def generate_reports(
    model: LlavaForConditionalGeneration | PeftModel,
    processor: RRGProcessor,
    pixel_values: torch.Tensor | Sequence[ImageInput],
    prompts: Sequence[str],
    max_new_tokens: int = 100,
    num_beams: int = 1,
    do_sample: bool = False,
) -> list[str]:
    """Generates one report per image (or view group); the image token is never emitted.

    Args:
        model: the report generator (plain or LoRA-wrapped).
        processor: its processor.
        pixel_values: ``(B, 3, H, W)`` / ``(B, V, 3, H, W)`` tensors or B PIL images.
        prompts: B instruction texts.
        max_new_tokens: generation budget per report.
        num_beams: beam width (1: greedy or sampling).
        do_sample: sample instead of greedy/beam decoding.

    Returns:
        B decoded reports without special tokens.
    """
    inputs = to_model_device(model, processor.build_generation_batch(prompts, pixel_values))
    ids = generate_response_ids(model, processor, inputs, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                do_sample=do_sample)
    return processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
