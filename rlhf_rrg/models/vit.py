"""Plain ViT encoder (cls first, pre-norm blocks, SDPA attention), the alternative to the Mamba backbone.

Module names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) so timm ViT weights map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_rrg.models.mamba import PatchEmbed


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    Args:
        hidden_size: Model width.
        num_heads: Number of heads (must divide ``hidden_size``).
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_attention_heads={num_heads} must divide hidden_size={hidden_size}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, l, d) -> (b, l, d)."""
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, length, d))


class Mlp(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d) -> (..., d)."""
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x += attn(norm1(x)); x += mlp(norm2(x))``."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.mlp = Mlp(hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, l, d) -> (b, l, d)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """ViT encoder returning the final-normed tokens with the cls token at position 0.

    Args:
        image_size: Square input side in pixels.
        patch_size: Patch side in pixels.
        num_channels: Input channels.
        hidden_size: Model width.
        num_layers: Number of blocks.
        num_heads: Attention heads.
        intermediate_size: MLP hidden width.
        norm_eps: LayerNorm epsilon.
        initializer_range: Std of the truncated-normal init of Linear weights and embeddings.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_channels: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        self.initializer_range = initializer_range
        self.patch_embed = PatchEmbed(image_size, patch_size, num_channels, hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, hidden_size))
        self.blocks = nn.ModuleList(
            ViTBlock(hidden_size, num_heads, intermediate_size, norm_eps) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                self.init_linear(module)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """timm's init for the parameters this module owns."""
        nn.init.trunc_normal_(self.pos_embed, std=self.initializer_range)
        nn.init.trunc_normal_(self.cls_token, std=1e-6)

    @torch.no_grad()
    def init_linear(self, module: nn.Linear) -> None:
        """timm's Linear init: truncated normal weights, zero bias."""
        nn.init.trunc_normal_(module.weight, std=self.initializer_range)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Encode images.

        Args:
            pixel_values: (b, c, h, w).
            output_hidden_states: Also return the token sequence before the first block and after every block.

        Returns:
            (final-normed tokens (b, 1 + n, d) with cls at 0, tuple of ``num_layers + 1`` tensors (b, 1 + n, d)).
        """
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        states: list[torch.Tensor] = [x] if output_hidden_states else []
        for block in self.blocks:
            x = block(x)
            if output_hidden_states:
                states.append(x)
        return self.norm(x), tuple(states)
