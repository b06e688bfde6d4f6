"""Scalar value head on the policy's last hidden states (shared trunk), for PPO's GAE baseline."""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """``V(s_t) = w . h_t + b`` per position.

    Initialised to zero (as TRL's former ``ValueHead`` with ``v_head_init_strategy="zero"`` and torchtune's
    reward-model init), so the first advantages are the raw KL-penalised returns instead of noise from a
    random projection of the trunk.

    Args:
        hidden_size: Width of the trunk's hidden states.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values ``(b, t)`` in fp32 from hidden states ``(b, t, hidden_size)``."""
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1).float()
