"""The classes an export's ``auto_map`` names, so plain transformers loads it with ``trust_remote_code=True``.

An export's ``config.json`` is a stock LLaVA config whose ``vision_config`` has ``model_type="rrg_vision"``, which
transformers does not know. These subclasses change nothing but where they live: importing this module (a copy of
it, saved into the export next to the vision encoder's code) registers ``rrg_vision`` with ``AutoConfig`` and
``AutoModel`` before transformers parses the config, so the export loads where ``rlhf_rrg`` is not installed.
:meth:`RRGLlavaForConditionalGeneration.generate_reports` adds what ``generate`` alone cannot: the prompt of
training (retrieved context images and reports, R2GenCSR residual features, disease clues) from ``prompting/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from rlhf_rrg.models.vision import RRGVisionConfig

__all__ = ["RRGLlavaConfig", "RRGLlavaForConditionalGeneration", "RRGVisionConfig"]


class RRGLlavaConfig(LlavaConfig):
    """``LlavaConfig`` (same ``model_type``) with the ``rrg_vision`` sub-config registered."""


class RRGLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` over :class:`RRGLlavaConfig`; the weights' names are unchanged."""

    config_class = RRGLlavaConfig

    def generate_reports(
        self,
        processor: Any,
        images: torch.Tensor | Sequence[Any],
        max_new_tokens: int = 100,
        num_beams: int = 1,
        export_dir: str | Path | None = None,
    ) -> list[str]:
        """One report per study, prompted exactly as in training (what ``ReportGenerator.generate`` does).

        Args:
            processor: the export's processor (``AutoProcessor.from_pretrained(export, trust_remote_code=True)``).
            images: ``(b, V, 3, H, W)`` normalised tensors, or b studies, each a PIL image or a list of the V views
                the export was trained with (``prompting.views``, e.g. 2 for IU-Xray).
            max_new_tokens: generation budget per report.
            num_beams: beam width.
            export_dir: the export folder; default: the folder or Hub repository this model was loaded from.

        Returns:
            b reports.
        """
        # Imported here: plain ``generate`` needs none of the prompting code (or its dependencies, e.g. peft).
        from rlhf_rrg.prompting.generator import ReportGenerator

        export = Path(export_dir) if export_dir is not None else Path(self.name_or_path)
        cached = self.__dict__.get("_report_generator")
        if cached is None or cached[0] != (export, id(processor)):
            source = export
            if not source.is_dir():
                from huggingface_hub import snapshot_download

                source = Path(snapshot_download(self.name_or_path, allow_patterns=["prompting/*"]))
            # Built once per export and processor (it loads the memory bank); a plain attribute, out of the module
            # tree, since the wrapper holds this model. It hooks nothing outside its own calls, so ``generate``
            # before or after this call sees the model as the user left it.
            self.__dict__["_report_generator"] = ((export, id(processor)),
                                                  ReportGenerator.with_prompting(self, processor, source))
        generator = self.__dict__["_report_generator"][1]
        if not isinstance(images, torch.Tensor):
            studies = [study if isinstance(study, (list, tuple)) else [study] for study in images]
            images = torch.stack([torch.stack([processor.preprocess_image(v) for v in views]) for views in studies])
        return generator.generate(images, max_new_tokens=max_new_tokens, num_beams=num_beams)


# transformers saves LLaVA checkpoints in the original key layout and renames on load, but only for its own classes:
# without this a subclass would load the saved ``language_model.lm_head`` as an unexpected key.
register_checkpoint_conversion_mapping(
    RRGLlavaForConditionalGeneration.__name__, get_checkpoint_conversion_mapping("llava"), overwrite=True
)
