"""Encode once: a frozen vision tower's outputs computed one time and replayed to every later forward.

An RL step runs the LLaVA model many times on the same images (generation, old/reference/value forwards, every PPO
epoch and minibatch, each of k samples). With the tower frozen its outputs cannot change within the step, so
:func:`encode_frozen` runs it once per distinct image and :func:`replay_features` makes the tower hand those
outputs back instead of encoding. LLaVA's own feature selection and the trainable projector still run in every
forward, so gradients reach the projector and the LLM exactly as without the cache.

A trainable tower: :func:`freeze_unread_vision` freezes the parts of it that LLaVA's feature selection never reads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from rlhf_rrg.models.vision import RRGVisionModel

logger = logging.getLogger(__name__)


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


def freeze_unread_vision(model: nn.Module, output_read: bool) -> list[str]:
    """Freezes the trainable vision-tower parameters of ``model`` that no loss can reach.

    LLaVA feeds the projector ``hidden_states[vision_feature_layer]``, taken before the encoder's final norm (and
    before any later block), so those weights get a gradient only when the normed output is read as well
    (``output_read``: the TRRG clue head reads ``pooler_output``). Single-process training leaves such weights
    unchanged anyway (no gradient, no optimizer update); DDP aborts on them at its second step ("parameters that
    were not used in producing loss"). Freezing them keeps every process count the same function and costs nothing,
    unlike ``find_unused_parameters=True``, which searches the graph at every step.

    Args:
        model: The LLaVA report generator (plain, or PEFT with the tower in ``modules_to_save``).
        output_read: Whether a training loss reads the tower's normed output (``pooler_output``).

    Returns:
        The names (under the tower) of the parameters frozen here.
    """
    tower = vision_tower_of(model)
    frozen: list[str] = []
    for prefix, module in tower.named_modules():
        if not isinstance(module, RRGVisionModel):
            continue
        for name in module.unread_modules(model.config.vision_feature_layer, output_read):
            for param_name, param in module.get_submodule(name).named_parameters():
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen.append(".".join(filter(None, (prefix, name, param_name))))
    if frozen:
        logger.info("vision tower: %d parameters no loss reads are frozen (%s)", len(frozen), ", ".join(frozen))
    return frozen


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
