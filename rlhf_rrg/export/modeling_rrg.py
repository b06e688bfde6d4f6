"""The classes an export's ``auto_map`` names, so plain transformers loads it with ``trust_remote_code=True``.

An export's ``config.json`` is a stock LLaVA config whose ``vision_config`` has ``model_type="rrg_vision"``, which
transformers does not know. These subclasses change nothing but where they live: importing this module (a copy of
it, saved into the export next to the vision encoder's code) registers ``rrg_vision`` with ``AutoConfig`` and
``AutoModel`` before transformers parses the config, so the export loads where ``rlhf_rrg`` is not installed.
"""

from __future__ import annotations

from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from rlhf_rrg.models.vision import RRGVisionConfig

__all__ = ["RRGLlavaConfig", "RRGLlavaForConditionalGeneration", "RRGVisionConfig"]


class RRGLlavaConfig(LlavaConfig):
    """``LlavaConfig`` (same ``model_type``) with the ``rrg_vision`` sub-config registered."""


class RRGLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` over :class:`RRGLlavaConfig`; the weights' names are unchanged."""

    config_class = RRGLlavaConfig


# transformers saves LLaVA checkpoints in the original key layout and renames on load, but only for its own classes:
# without this a subclass would load the saved ``language_model.lm_head`` as an unexpected key.
register_checkpoint_conversion_mapping(
    RRGLlavaForConditionalGeneration.__name__, get_checkpoint_conversion_mapping("llava"), overwrite=True
)
