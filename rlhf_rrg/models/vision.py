"""Hugging Face wrappers that let our vision encoders act as a LLaVA ``vision_config`` / ``vision_tower``.

Importing this module registers ``model_type="rrg_vision"`` with ``AutoConfig`` and ``AutoModel`` (idempotent), so
``LlavaForConditionalGeneration`` builds the tower with ``AutoModel.from_config`` and save/load round-trips through
the Auto classes.

Every returned sequence has one summary token at position 0 followed by the ``N`` patch tokens in raster order,
because LLaVA's "default" feature strategy drops index 0:

- ``vim``: Vim's middle cls token is moved to position 0; ``pooler_output`` is the normed cls token.
- ``vit``: cls is already first; ``pooler_output`` is the normed cls token.
- ``arm``: the causal encoder has no cls token; position 0 holds the mean of the patch tokens of that sequence and
  ``pooler_output`` is the mean of the normed patch tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from rlhf_rrg.models.mamba import MambaEncoder, MambaMixer, RMSNorm
from rlhf_rrg.models.vit import ViTEncoder

ENCODER_TYPES = ("vim", "arm", "vit")


class RRGVisionConfig(PreTrainedConfig):
    """Configuration of :class:`RRGVisionModel`.

    Fields: ``encoder_type`` ("vim": bidirectional Vim with a middle cls token, "arm": causal Mamba without cls,
    "vit": plain ViT), ``image_size``, ``patch_size``, ``num_channels``, ``hidden_size``, ``num_hidden_layers``,
    Mamba's ``d_state`` / ``d_conv`` / ``expand``, ViT's ``num_attention_heads`` / ``intermediate_size``,
    ``layer_norm_eps`` and ``initializer_range``.
    """

    model_type = "rrg_vision"
    base_config_key = "vision_config"

    encoder_type: str = "vim"
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 384
    num_hidden_layers: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    num_attention_heads: int = 6
    intermediate_size: int = 1536
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(f"RRGVisionConfig.encoder_type must be one of {ENCODER_TYPES}; got {self.encoder_type!r}")
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "d_state",
                     "d_conv", "expand", "num_attention_heads", "intermediate_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"RRGVisionConfig.{name} must be a positive int; got {getattr(self, name)!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"RRGVisionConfig.image_size={self.image_size} must be a multiple of patch_size={self.patch_size}"
            )
        if self.encoder_type == "vit" and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"RRGVisionConfig.num_attention_heads={self.num_attention_heads} must divide "
                f"hidden_size={self.hidden_size}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class RRGVisionModel(PreTrainedModel):
    """Vision tower for LLaVA: ``forward(pixel_values) -> BaseModelOutputWithPooling`` (see module docstring)."""

    config_class = RRGVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    base_model_prefix = "rrg_vision"
    _supports_sdpa = True
    _no_split_modules = ["MambaBlock", "ViTBlock"]

    def __init__(self, config: RRGVisionConfig) -> None:
        super().__init__(config)
        if config.encoder_type == "vit":
            self.encoder: MambaEncoder | ViTEncoder = ViTEncoder(
                image_size=config.image_size,
                patch_size=config.patch_size,
                num_channels=config.num_channels,
                hidden_size=config.hidden_size,
                num_layers=config.num_hidden_layers,
                num_heads=config.num_attention_heads,
                intermediate_size=config.intermediate_size,
                norm_eps=config.layer_norm_eps,
                initializer_range=config.initializer_range,
            )
        else:
            is_vim = config.encoder_type == "vim"
            self.encoder = MambaEncoder(
                image_size=config.image_size,
                patch_size=config.patch_size,
                num_channels=config.num_channels,
                hidden_size=config.hidden_size,
                num_layers=config.num_hidden_layers,
                d_state=config.d_state,
                d_conv=config.d_conv,
                expand=config.expand,
                bidirectional=is_vim,
                use_cls_token=is_vim,
                norm_eps=config.layer_norm_eps,
            )
        self.post_init()

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers calls this bottom-up for modules not (fully) loaded from a checkpoint; torch.nn.init calls are
        # guarded there, but MambaMixer writes A_log/D/dt bias directly, so a mixer with loaded weights is left as is.
        if isinstance(module, MambaMixer):
            if not any(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
                module.reset_parameters()
        elif isinstance(module, nn.Linear) and isinstance(self.encoder, ViTEncoder):
            self.encoder.init_linear(module)
        elif isinstance(module, (MambaEncoder, ViTEncoder, RMSNorm, nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm)):
            module.reset_parameters()

    def unread_modules(self, feature_layers: int | Sequence[int], output_read: bool) -> list[str]:
        """Submodules (names relative to this model) that nothing reaches when a model reads only
        ``hidden_states[i]`` for ``i`` in ``feature_layers`` (LLaVA's ``vision_feature_layer``, negative from the
        end) and, with ``output_read``, ``last_hidden_state`` / ``pooler_output`` too.

        ``hidden_states[j]`` is the stream after the first ``j`` blocks, before the final norm: the blocks from the
        deepest layer read and the final norm get no gradient unless the normed output is read. DDP needs every
        trainable parameter in the loss, so what a configuration does not read must not train.
        """
        if output_read:
            return []
        encoder = self.encoder
        blocks, norm = ("blocks", "norm") if isinstance(encoder, ViTEncoder) else ("layers", "norm_f")
        count = len(getattr(encoder, blocks))
        layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
        deepest = max(layer % (count + 1) for layer in layers)
        return [f"encoder.{blocks}.{i}" for i in range(deepest, count)] + [f"encoder.{norm}"]

    def _to_summary_first(self, seq: torch.Tensor) -> torch.Tensor:
        """(b, l, d) in encoder order -> (b, 1 + n, d) with the summary token first (see module docstring)."""
        encoder = self.encoder
        if isinstance(encoder, ViTEncoder):
            return seq
        if encoder.cls_position is None:
            return torch.cat([seq.mean(1, keepdim=True), seq], dim=1)
        p = encoder.cls_position
        return torch.cat([seq[:, p : p + 1], seq[:, :p], seq[:, p + 1 :]], dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple[torch.Tensor, ...]:
        """Encode images.

        Args:
            pixel_values: (B, C, H, W), H = W = ``config.image_size``.
            output_hidden_states: Return the embeddings and the residual stream after every layer.
            return_dict: Return a ``BaseModelOutputWithPooling`` (default: ``config.return_dict``).
            **kwargs: Ignored extra LLaVA kwargs (e.g. ``output_attentions``: neither encoder exposes attentions).

        Returns:
            ``last_hidden_state`` (B, 1 + N, D) after the final norm, ``pooler_output`` (B, D), and when requested
            ``hidden_states``: ``num_hidden_layers + 1`` tensors (B, 1 + N, D), the last one before the final norm.
        """
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        if return_dict is None:
            return_dict = self.config.return_dict
        pixel_values = pixel_values.to(self.encoder.pos_embed.dtype)
        last, states = self.encoder(pixel_values, output_hidden_states=output_hidden_states)
        last = self._to_summary_first(last)
        hidden_states = tuple(self._to_summary_first(s) for s in states) if output_hidden_states else None
        pooled = last[:, 0]
        if not return_dict:
            return (last, pooled) + ((hidden_states,) if hidden_states is not None else ())
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden_states)


def tiny_vision_config(encoder_type: str) -> RRGVisionConfig:
    """Test-sized config: 64 px images, patch 8 (64 patches), width 64, depth 2."""
    return RRGVisionConfig(
        encoder_type=encoder_type,
        image_size=64,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        d_state=8,
        num_attention_heads=4,
        intermediate_size=128,
    )


def vim_small() -> RRGVisionConfig:
    """Vim-S: width 384, depth 24, patch 16, 224 px (loads ``vim_s_midclstok`` weights)."""
    return RRGVisionConfig(encoder_type="vim", image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=24)


def vim_base() -> RRGVisionConfig:
    """Vim-B: width 768, depth 24, patch 16, 224 px."""
    return RRGVisionConfig(encoder_type="vim", image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=24)


def arm_base() -> RRGVisionConfig:
    """ARM-B as pretrained in MambaXray-VL: causal Mamba, width 768, depth 24, patch 16, 192 px (12x12 patches)."""
    return RRGVisionConfig(encoder_type="arm", image_size=192, patch_size=16, hidden_size=768, num_hidden_layers=24)


def arm_small() -> RRGVisionConfig:
    """ARM at Vim-S width (384, depth 24), 192 px: the smaller encoder for IU-Xray-sized data."""
    return RRGVisionConfig(encoder_type="arm", image_size=192, patch_size=16, hidden_size=384, num_hidden_layers=24)


VISION_CONFIGS = {"vim_small": vim_small, "vim_base": vim_base, "arm_small": arm_small, "arm_base": arm_base}

AutoConfig.register(RRGVisionConfig.model_type, RRGVisionConfig, exist_ok=True)
AutoModel.register(RRGVisionConfig, RRGVisionModel, exist_ok=True)
