"""R2GenCSR's residual context: context image slots carry (query - context) visual features.

R2GenCSR feeds the LLM, in place of each retrieved sample's features, their difference from the query study's
features, so the context tells the model how the query departs from a normal and an abnormal example rather than
repeating those examples. It is applied as a forward pre-hook on LLaVA's ``multi_modal_projector``, whose input is
every image's selected encoder features in prompt order, so the model stays a stock ``LlavaForConditionalGeneration``
(saves, loads and trains through TRL unchanged). The hook lives only inside :func:`residual_context_hook`'s block:
a permanent one would also regroup the images of every later plain ``generate`` call, which carry no context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


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


def projector_of(model: nn.Module) -> nn.Module:
    """LLaVA's ``multi_modal_projector`` of a report generator, plain or wrapped by PEFT (then its
    ``modules_to_save`` wrapper, which routes to the trained or, with the adapter disabled, the original copy)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.multi_modal_projector


def _pre_hook(num_context: int, num_query: int) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (residual_context(args[0], num_context, num_query), *args[1:])

    hook.residual_context = True  # marks our hook, so a nested block does not apply the residual twice
    return hook


@contextmanager
def residual_context_hook(projector: nn.Module, num_context: int, num_query: int) -> Iterator[None]:
    """Within the block, ``projector``'s inputs become residual context features; the hook is removed on leaving
    (on exceptions too). Inside a block already active on ``projector`` it adds nothing.

    Raises:
        ValueError: a count below 1.
    """
    if num_context < 1 or num_query < 1:
        raise ValueError(f"residual context needs context and query images, got {num_context} and {num_query}")
    if any(getattr(h, "residual_context", False) for h in projector._forward_pre_hooks.values()):
        yield
        return
    handle = projector.register_forward_pre_hook(_pre_hook(num_context, num_query))
    try:
        yield
    finally:
        handle.remove()
