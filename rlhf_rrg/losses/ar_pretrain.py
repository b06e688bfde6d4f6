"""Autoregressive next-cluster pixel pretraining (ARM, as used by MambaXray-VL) for the causal Mamba encoder.

The image's patches are grouped into square clusters of ``cluster_size x cluster_size`` patches, clusters in raster
order and patches in raster order inside each cluster. The causal encoder reads clusters ``1..K-1``; a
cross-attention decoder predicts the pixels of clusters ``2..K``, where the queries of cluster ``k+1`` (a learned
token plus the target patch's position embedding) attend only to encoder outputs of clusters ``<= k``. The loss is
the MSE against per-patch-normalised pixels (MAE's ``norm_pix_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_rrg.models.mamba import MambaEncoder
from rlhf_rrg.models.vision import RRGVisionModel
from rlhf_rrg.models.vit import Mlp


@dataclass
class ARPretrainConfig:
    """Settings of the ARM next-cluster pretraining head (the encoder comes from ``RRGVisionConfig``)."""

    cluster_size: int = field(default=4, metadata={"help": "Patches per cluster side (ARM: 4, i.e. 16 patches)."})
    decoder_depth: int = field(default=4, metadata={"help": "Number of cross-attention decoder blocks."})
    decoder_heads: int = field(default=16, metadata={"help": "Attention heads in the decoder."})
    decoder_dim: int = field(default=512, metadata={"help": "Decoder width."})
    norm_pix_loss: bool = field(default=True, metadata={"help": "Regress per-patch mean/std-normalised pixels."})

    def __post_init__(self) -> None:
        for name in ("cluster_size", "decoder_depth", "decoder_heads", "decoder_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ARPretrainConfig.{name} must be positive; got {getattr(self, name)}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"ARPretrainConfig.decoder_heads={self.decoder_heads} must divide decoder_dim={self.decoder_dim}"
            )


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into flattened patches in raster order.

    Args:
        pixel_values: (b, c, h, w), h and w multiples of ``patch_size``.
        patch_size: Patch side ``p``.

    Returns:
        (b, (h/p) * (w/p), p * p * c), each patch flattened in (row, column, channel) order.
    """
    b, c, h, w = pixel_values.shape
    x = pixel_values.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return torch.einsum("bcipjq->bijpqc", x).reshape(b, (h // patch_size) * (w // patch_size), -1)


def cluster_order(grid_size: int, cluster_size: int) -> torch.Tensor:
    """Raster patch indices listed cluster by cluster (clusters raster, patches raster inside a cluster).

    Args:
        grid_size: Patches per image side.
        cluster_size: Patches per cluster side; must divide ``grid_size``.

    Returns:
        (grid_size ** 2,) long tensor: position ``i`` of the cluster-ordered sequence is raster patch ``order[i]``.
    """
    if grid_size % cluster_size:
        raise ValueError(f"cluster_size={cluster_size} must divide the patch grid side {grid_size}")
    n = grid_size // cluster_size
    rows = torch.arange(n)[:, None, None, None] * cluster_size + torch.arange(cluster_size)[None, None, :, None]
    cols = torch.arange(n)[None, :, None, None] * cluster_size + torch.arange(cluster_size)[None, None, None, :]
    return (rows * grid_size + cols).reshape(-1)


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: queries attend to a memory under a boolean mask, then an MLP.

    Args:
        dim: Width of queries and memory.
        num_heads: Attention heads.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (b, lq, d); memory: (b, lm, d); mask: (lq, lm) bool, True = may attend. Returns (b, lq, d)."""
        b, lq, d = x.shape
        h = self.num_heads
        q = self.q(self.norm_q(x)).view(b, lq, h, d // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(memory)).view(b, memory.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, lq, d))
        return x + self.mlp(self.norm2(x))


class ARPretrainer(nn.Module):
    """Next-cluster pixel prediction around the causal encoder of an ``RRGVisionModel`` (``encoder_type="arm"``).

    Args:
        vision_model: The model being pretrained; its ``encoder`` weights are trained in place.
        cluster_size: Patches per cluster side.
        decoder_depth: Decoder blocks.
        decoder_heads: Decoder attention heads.
        decoder_dim: Decoder width.
        norm_pix_loss: Normalise each target patch by its own mean and (unbiased) std, as MAE does.
    """

    def __init__(
        self,
        vision_model: RRGVisionModel,
        cluster_size: int = 4,
        decoder_depth: int = 4,
        decoder_heads: int = 16,
        decoder_dim: int = 512,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        cfg = vision_model.config
        if cfg.encoder_type != "arm":
            raise ValueError(
                f"ARPretrainer needs a causal encoder: RRGVisionConfig.encoder_type must be 'arm', "
                f"got {cfg.encoder_type!r}"
            )
        grid = cfg.image_size // cfg.patch_size
        if grid % cluster_size:
            raise ValueError(
                f"ARPretrainConfig.cluster_size={cluster_size} must divide the patch grid side {grid} "
                f"(image_size={cfg.image_size} / patch_size={cfg.patch_size})"
            )
        self.vision_model = vision_model
        self.patch_size = cfg.patch_size
        self.tokens_per_cluster = cluster_size**2
        self.num_clusters = (grid // cluster_size) ** 2
        if self.num_clusters < 2:
            raise ValueError(
                f"ARPretrainConfig.cluster_size={cluster_size} leaves a single cluster: nothing to predict"
            )
        self.norm_pix_loss = norm_pix_loss
        self.register_buffer("order", cluster_order(grid, cluster_size), persistent=False)

        num_targets = (self.num_clusters - 1) * self.tokens_per_cluster
        target_cluster = torch.arange(num_targets) // self.tokens_per_cluster + 1  # clusters 1..K-1 (0-based)
        source_cluster = torch.arange(num_targets) // self.tokens_per_cluster  # clusters 0..K-2 (0-based)
        self.register_buffer("mask", source_cluster[None, :] < target_cluster[:, None], persistent=False)

        self.decoder_embed = nn.Linear(cfg.hidden_size, decoder_dim)
        self.query_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            CrossAttentionBlock(decoder_dim, decoder_heads) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, cfg.patch_size**2 * cfg.num_channels)
        self._init_decoder()

    @torch.no_grad()
    def _init_decoder(self) -> None:
        # MAE's decoder init: xavier-uniform Linear, zero bias, N(0, 0.02) tokens
        nn.init.normal_(self.query_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("vision_model"):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def encoder(self) -> MambaEncoder:
        return self.vision_model.encoder

    def targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Regression targets: pixels of clusters 2..K, (b, (K-1) * T, p * p * c) in cluster order."""
        patches = patchify(pixel_values, self.patch_size)[:, self.order[self.tokens_per_cluster :]]
        if self.norm_pix_loss:
            mean = patches.mean(-1, keepdim=True)
            var = patches.var(-1, keepdim=True)
            patches = (patches - mean) / (var + 1e-6).sqrt()
        return patches

    def predict(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of clusters 2..K from clusters 1..K-1, (b, (K-1) * T, p * p * c) in cluster order."""
        tokens = self.encoder.embed(pixel_values.to(self.encoder.pos_embed.dtype))[:, self.order]
        context = tokens[:, : -self.tokens_per_cluster]  # clusters 1..K-1
        memory, _ = self.encoder.forward_tokens(context)
        memory = self.decoder_embed(memory)
        queries = self.query_token + self.decoder_pos_embed[:, self.order[self.tokens_per_cluster :]]
        x = queries.expand(pixel_values.shape[0], -1, -1)
        for block in self.decoder_blocks:
            x = block(x, memory, self.mask)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-cluster pixel loss.

        Args:
            pixel_values: (b, c, h, w) at the encoder's ``image_size``.

        Returns:
            (scalar MSE loss, predictions (b, (K-1) * T, p * p * c) for clusters 2..K in cluster order).
        """
        predictions = self.predict(pixel_values)
        loss = F.mse_loss(predictions.float(), self.targets(pixel_values).float())
        return loss, predictions


def build_ar_pretrainer(vision_model: RRGVisionModel, cfg: ARPretrainConfig) -> ARPretrainer:
    """Build an :class:`ARPretrainer` from its config."""
    return ARPretrainer(
        vision_model,
        cluster_size=cfg.cluster_size,
        decoder_depth=cfg.decoder_depth,
        decoder_heads=cfg.decoder_heads,
        decoder_dim=cfg.decoder_dim,
        norm_pix_loss=cfg.norm_pix_loss,
    )
