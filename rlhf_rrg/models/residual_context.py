"""R2GenCSR's residual context: context image slots carry (query - context) visual features.

R2GenCSR feeds the LLM, in place of each retrieved sample's features, their difference from the query study's
features, so the context tells the model how the query departs from a normal and an abnormal example rather than
repeating those examples. It is applied as a forward pre-hook on LLaVA's ``multi_modal_projector``, whose input is
every image's selected encoder features in prompt order, so the model stays a stock ``LlavaForConditionalGeneration``
(saves, loads and trains through TRL unchanged) and the hook is re-attached from the prompting settings on load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def residual_context(features: torch.Tensor, num_context: int, num_query: int) -> torch.Tensor:
    """Replaces each prompt's context features by (mean query features - context features).

    Args:
        features: ``(b * (num_context + num_query), n, d)`` encoder features of every image, grouped per prompt,
            context images first (negatives, positives), then the query study's views.
        num_context: context images per prompt.
        num_query: query views per prompt (their features are averaged per token position).

    Returns:
        Same shape; query features unchanged.
    """
    group = num_context + num_query
    if features.shape[0] % group:
        raise ValueError(f"{features.shape[0]} images do not split into prompts of {num_context} context + "
                         f"{num_query} query images")
    grouped = features.reshape(-1, group, *features.shape[1:])
    query = grouped[:, num_context:]
    context = query.mean(1, keepdim=True) - grouped[:, :num_context]
    return torch.cat([context, query], dim=1).reshape(features.shape)


def _pre_hook(num_context: int, num_query: int) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (residual_context(args[0], num_context, num_query), *args[1:])

    return hook


def attach_residual_context(projector: nn.Module, num_context: int, num_query: int) -> RemovableHandle:
    """Hooks ``projector`` (LLaVA's ``multi_modal_projector``) so its inputs become residual context features."""
    if num_context < 1 or num_query < 1:
        raise ValueError(f"residual context needs context and query images, got {num_context} and {num_query}")
    return projector.register_forward_pre_hook(_pre_hook(num_context, num_query))
