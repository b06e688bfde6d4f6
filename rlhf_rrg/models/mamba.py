"""Vision Mamba (Vim) encoder: Mamba mixers, RMSNorm, residual blocks, patch embedding with a middle cls token.

Parameter names follow hustvl/Vim (``vim/models_mamba.py``) and its ``mamba-1p1p1/mamba_ssm/modules/mamba_simple.py``
so the released checkpoints load with ``strict=True`` through :func:`load_vim_state_dict`. The bidirectional mixer
is Vim's "v2": a second conv/x_proj/dt_proj/A/D set scans the reversed sequence, in/out projections are shared and
the two directions are averaged. ``bidirectional=False`` gives the causal (ARM-style) encoder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_rrg.models.scan import recomputed_selective_scan

logger = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """RMSNorm as in mamba-ssm (weight only, statistics in fp32)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., hidden) -> (..., hidden), same dtype."""
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return out.to(x.dtype)


class MambaMixer(nn.Module):
    """Mamba (S6) mixer; with ``bidirectional`` it is Vim's "v2" bidirectional mixer.

    Args:
        d_model: Model width.
        d_state: SSM state size per channel (``n``).
        d_conv: Depthwise causal convolution width.
        expand: Inner width factor (``d_inner = expand * d_model``).
        bidirectional: Add the reversed-sequence branch (``*_b`` parameters).
        divide_out: Average instead of summing the two directions (Vim's ``if_divide_out``; its released models
            use True).
        num_residual_layers: Depth used to scale ``out_proj`` at init (GPT-2 scheme, as in Vim).
        dt_min: Smallest initial step size.
        dt_max: Largest initial step size.
        dt_init_floor: Floor on the initial step size.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        bidirectional: bool = False,
        divide_out: bool = True,
        num_residual_layers: int = 1,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.bidirectional, self.divide_out = bidirectional, divide_out
        self.num_residual_layers = num_residual_layers
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d, self.x_proj, self.dt_proj = self._branch_modules()
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        if bidirectional:
            self.conv1d_b, self.x_proj_b, self.dt_proj_b = self._branch_modules()
            self.A_b_log = nn.Parameter(torch.empty(self.d_inner, d_state))
            self.D_b = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_parameters()

    def _branch_modules(self) -> tuple[nn.Conv1d, nn.Linear, nn.Linear]:
        conv = nn.Conv1d(
            self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, padding=self.d_conv - 1, bias=True
        )
        x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        return conv, x_proj, dt_proj

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's init: S4D-real A, D = 1, dt_proj so that softplus(bias) is log-uniform in [dt_min, dt_max]."""
        suffixes = ["", "_b"] if self.bidirectional else [""]
        for sfx in suffixes:
            dt_proj: nn.Linear = getattr(self, f"dt_proj{sfx}")
            std = self.dt_rank**-0.5
            nn.init.uniform_(dt_proj.weight, -std, std)
            log_lo, log_hi = math.log(self.dt_min), math.log(self.dt_max)
            dt = torch.exp(torch.rand(self.d_inner) * (log_hi - log_lo) + log_lo).clamp(min=self.dt_init_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            a_log = self.A_log if sfx == "" else self.A_b_log
            a_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(a_log))
            nn.init.ones_(self.D if sfx == "" else self.D_b)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        self.out_proj.weight.div_(math.sqrt(self.num_residual_layers))

    def _scan_inputs(
        self,
        reverse: bool,
        x: torch.Tensor,
        z: torch.Tensor,
        conv_weight: torch.Tensor,
        conv_bias: torch.Tensor,
        x_proj_weight: torch.Tensor,
        dt_proj_weight: torch.Tensor,
        dt_proj_bias: torch.Tensor,
        A_log: torch.Tensor,
        D: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """x, z: (b, d_inner, l) -> selective_scan's (u, delta, A, B, C, D, z, delta_bias) for one direction.

        Reads the parameters as arguments (not through the modules) because it runs again in backward
        (:func:`recomputed_selective_scan`), which must hand their gradients back explicitly.
        """
        if reverse:
            x, z = x.flip(-1), z.flip(-1)
        length = x.shape[-1]
        x = F.silu(F.conv1d(x, conv_weight, conv_bias, padding=self.d_conv - 1, groups=self.d_inner)[..., :length])
        dt, B, C = F.linear(x.transpose(1, 2), x_proj_weight).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        delta = (dt @ dt_proj_weight.t()).transpose(1, 2)  # bias goes in as delta_bias, as in mamba-ssm
        A = -torch.exp(A_log.float())
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
        return x, delta, A, B, C, D.float(), z, dt_proj_bias.float()

    def _scan_branch(self, x: torch.Tensor, z: torch.Tensor, sfx: str) -> torch.Tensor:
        """x, z: (b, d_inner, l) -> (b, d_inner, l) in the branch's scan order (reversed for ``_b``): conv,
        input-dependent (dt, B, C), selective scan gated by z. Only x, z and the parameters are saved for backward."""
        conv: nn.Conv1d = getattr(self, f"conv1d{sfx}")
        dt_proj: nn.Linear = getattr(self, f"dt_proj{sfx}")
        return recomputed_selective_scan(
            partial(self._scan_inputs, sfx == "_b"),
            x,
            z,
            conv.weight,
            conv.bias,
            getattr(self, f"x_proj{sfx}").weight,
            dt_proj.weight,
            dt_proj.bias,
            self.A_log if sfx == "" else self.A_b_log,
            self.D if sfx == "" else self.D_b,
            delta_softplus=True,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (b, l, d_model) -> (b, l, d_model)."""
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (b, 2 d_inner, l)
        x, z = xz.chunk(2, dim=1)
        y = self._scan_branch(x, z, "")
        if self.bidirectional:
            y_b = self._scan_branch(x, z, "_b")
            y = y + y_b.flip(-1)
            if self.divide_out:
                y = y / 2
        return self.out_proj(y.transpose(1, 2))


class MambaBlock(nn.Module):
    """Vim's residual block: ``residual += hidden; hidden = mixer(norm(residual))`` (no MLP).

    Args:
        d_model: Model width.
        d_state: SSM state size.
        d_conv: Convolution width.
        expand: Inner width factor.
        bidirectional: Use the bidirectional (v2) mixer.
        num_residual_layers: Encoder depth, for the ``out_proj`` init scale.
        norm_eps: RMSNorm epsilon.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        d_conv: int,
        expand: int,
        bidirectional: bool,
        num_residual_layers: int,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.mixer = MambaMixer(
            d_model, d_state, d_conv, expand, bidirectional=bidirectional, num_residual_layers=num_residual_layers
        )
        self.norm = RMSNorm(d_model, eps=norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states, residual: (b, l, d) -> (mixer output, updated residual kept in fp32), both (b, l, d)."""
        residual = hidden_states if residual is None else residual + hidden_states
        residual = residual.float()  # Vim's residual_in_fp32
        hidden_states = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))
        return hidden_states, residual


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (B, C, H, W) -> (B, N, D), raster order (module name ``proj`` as in timm)."""

    def __init__(self, image_size: int, patch_size: int, num_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(num_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (b, c, h, w) with h = w = image_size -> (b, num_patches, hidden)."""
        h, w = pixel_values.shape[-2:]
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"pixel_values are {h}x{w} but the encoder's image_size is {self.image_size}")
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class MambaEncoder(nn.Module):
    """Vim encoder: patch embed, optional middle cls token, absolute pos embed, Mamba blocks, final RMSNorm.

    Args:
        image_size: Square input side in pixels.
        patch_size: Patch side in pixels.
        num_channels: Input channels.
        hidden_size: Model width.
        num_layers: Number of blocks.
        d_state: SSM state size.
        d_conv: Convolution width.
        expand: Inner width factor.
        bidirectional: Vim's bidirectional v2 mixer; False gives a causal encoder (raster scan order).
        use_cls_token: Insert a cls token at position ``num_patches // 2`` (Vim's middle cls token).
        norm_eps: RMSNorm epsilon.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_channels: int,
        hidden_size: int,
        num_layers: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        bidirectional: bool = True,
        use_cls_token: bool = True,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, num_channels, hidden_size)
        num_patches = self.patch_embed.num_patches
        self.cls_position: int | None = num_patches // 2 if use_cls_token else None
        if use_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + int(use_cls_token), hidden_size))
        self.layers = nn.ModuleList(
            MambaBlock(hidden_size, d_state, d_conv, expand, bidirectional, num_layers, norm_eps)
            for _ in range(num_layers)
        )
        self.norm_f = RMSNorm(hidden_size, eps=norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Vim's init for the parameters this module owns (children initialise themselves)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_position is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (b, c, h, w) -> tokens (b, l, d) with pos embed; l = num_patches (+1 for the cls token)."""
        x = self.patch_embed(pixel_values)
        if self.cls_position is not None:
            p = self.cls_position
            x = torch.cat([x[:, :p], self.cls_token.expand(x.shape[0], -1, -1), x[:, p:]], dim=1)
        return x + self.pos_embed

    def forward_tokens(
        self, tokens: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Run the blocks and the final norm over an embedded sequence.

        Args:
            tokens: (b, l, d), any length (the ARM pretrainer feeds a prefix of clusters).
            output_hidden_states: Also return the residual stream before the first block and after every block.

        Returns:
            (normed output (b, l, d), tuple of ``num_layers + 1`` streams (b, l, d), empty unless requested).
        """
        hidden, residual = tokens, None
        states: list[torch.Tensor] = [tokens] if output_hidden_states else []
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
            if output_hidden_states:
                states.append((residual + hidden).to(tokens.dtype))
        residual = hidden if residual is None else residual + hidden
        return self.norm_f(residual.to(self.norm_f.weight.dtype)), tuple(states)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """pixel_values (b, c, h, w) -> (normed tokens (b, l, d) in Vim order, hidden streams); see forward_tokens."""
        return self.forward_tokens(self.embed(pixel_values), output_hidden_states)


def load_vim_state_dict(encoder: MambaEncoder, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a released hustvl/Vim checkpoint into ``encoder`` with ``strict=True``.

    The classification head (``head.*``) is the only part of a Vim checkpoint we do not model; it is dropped and
    logged. A ``{"model": state_dict}`` wrapper (how Vim saves) is unwrapped.

    Args:
        encoder: A :class:`MambaEncoder` built with the checkpoint's width, depth and ``bidirectional=True``.
        state_dict: The checkpoint's state dict, or Vim's ``{"model": ...}`` file content.
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    dropped = sorted(k for k in state_dict if k.startswith("head."))
    if dropped:
        logger.info("load_vim_state_dict: dropping classifier keys %s", dropped)
    encoder.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("head.")}, strict=True)
