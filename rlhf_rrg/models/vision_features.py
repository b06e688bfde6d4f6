"""Encode once: a frozen vision tower's outputs computed one time and replayed to every later forward.

An RL step runs the LLaVA model many times on the same images (generation, old/reference/value forwards, every PPO
epoch and minibatch, each of k samples). With the tower frozen its outputs cannot change within the step, so
:func:`encode_frozen` runs it once per distinct image and :func:`replay_features` makes the tower hand those
outputs back instead of encoding. LLaVA's own feature selection and the trainable projector still run in every
forward, so gradients reach the projector and the LLM exactly as without the cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling


@dataclass
class VisionFeatures:
    """The tower outputs LLaVA and the clue head read, for ``n`` images.

    Attributes:
        hidden_states: ``num_hidden_layers + 1`` entries; the layers LLaVA selects hold ``(n, 1 + N, d)`` tensors,
            every other entry is None (never read, never stored).
        pooled: ``(n, d)`` pooled summary token (the clue head's input).
    """

    hidden_states: tuple[torch.Tensor | None, ...]
    pooled: torch.Tensor

    @property
    def num_images(self) -> int:
        return self.pooled.shape[0]

    def select(self, rows: torch.Tensor) -> VisionFeatures:
        """Features of image ``rows`` (a ``(m,)`` index tensor), in that order."""
        return VisionFeatures(tuple(None if h is None else h[rows] for h in self.hidden_states), self.pooled[rows])


def vision_tower_of(model: nn.Module) -> nn.Module:
    """The vision tower of a LLaVA report generator, plain or wrapped by PEFT."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.vision_tower


def tower_is_frozen(tower: nn.Module) -> bool:
    return not any(p.requires_grad for p in tower.parameters())


@torch.no_grad()
def encode_frozen(model: nn.Module, pixel_values: torch.Tensor) -> VisionFeatures | None:
    """One pass of ``model``'s vision tower over ``pixel_values``; None when the tower trains (nothing to reuse).

    Args:
        model: The LLaVA report generator (plain or PEFT); its config names the layers the projector reads.
        pixel_values: ``(n, 3, H, W)`` on the model's device.

    Returns:
        The :class:`VisionFeatures` of the ``n`` images, or None.
    """
    tower = vision_tower_of(model)
    if not tower_is_frozen(tower):
        return None
    out = tower(pixel_values, output_hidden_states=True, return_dict=True)
    layer = model.config.vision_feature_layer
    keep = {i % len(out.hidden_states) for i in ([layer] if isinstance(layer, int) else layer)}
    hidden = tuple(h if i in keep else None for i, h in enumerate(out.hidden_states))
    return VisionFeatures(hidden, out.pooler_output)


@contextmanager
def replay_features(model: nn.Module, features: VisionFeatures | None) -> Iterator[None]:
    """Within the block, ``model``'s vision tower returns ``features`` instead of encoding (no-op for None).

    The tower still receives the pixel batch; it must have exactly ``features.num_images`` rows, in the same order.
    """
    if features is None:
        yield
        return
    tower = vision_tower_of(model)
    shadowed = tower.__dict__.get("forward")  # e.g. an accelerate hook; restored afterwards

    def replay(pixel_values: torch.Tensor, *args, **kwargs) -> BaseModelOutputWithPooling:
        if pixel_values.shape[0] != features.num_images:
            raise ValueError(f"replay_features: {pixel_values.shape[0]} images passed to the vision tower but "
                             f"{features.num_images} were encoded")
        # only what LLaVA and the clue head read; the final-normed sequence was not kept
        return BaseModelOutputWithPooling(pooler_output=features.pooled, hidden_states=features.hidden_states)

    tower.forward = replay
    try:
        yield
    finally:
        if shadowed is None:
            del tower.forward
        else:
            tower.forward = shadowed
