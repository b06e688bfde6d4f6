"""Writes exports: the report generator's weights, processor and remote code (:func:`save_rrg`), and a whole
``ReportGenerator`` with its ``prompting/`` folder and model card (:func:`save_generator`).

``ReportGenerator.from_export`` (:mod:`rlhf_rrg.prompting.generator`) and ``load_rrg`` (:mod:`rlhf_rrg.models.rrg`)
read what these write.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

from peft import PeftModel
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

from rlhf_rrg.config import save_config
from rlhf_rrg.export.model_card import write_model_card
from rlhf_rrg.export.remote_code import write_remote_code
from rlhf_rrg.models.processor import RRGProcessor
from rlhf_rrg.prompting.generator import (
    CLUE_HEAD_FILE,
    CLUE_HEAD_META,
    PROMPTING_DIR,
    SETTINGS_FILE,
    ReportGenerator,
)

logger = logging.getLogger(__name__)


def save_rrg(model: LlavaForConditionalGeneration | PeftModel, processor: RRGProcessor, out_dir: str | Path) -> Path:
    """Exports a standalone model for the next stage; a LoRA model also keeps its adapter.

    Layout: ``out_dir/`` holds the (LoRA-merged) LLaVA weights, configs, the processor and the code that loads them
    in plain transformers (``trust_remote_code=True``), loadable by ``load_rrg``; ``out_dir/adapter/`` holds the PEFT
    adapter (with the projector) when ``model`` is a ``PeftModel``, its ``base_model_name_or_path`` naming a folder
    that exists (see :func:`adapter_base`), relative to ``adapter/``. The live model is not modified.

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        adapter_dir = out_dir / "adapter"
        model.peft_config[model.active_adapter].base_model_name_or_path = adapter_base(model, adapter_dir)
        model.save_pretrained(adapter_dir)
        _relative_adapter_base(adapter_dir)
        # Merging rewrites the base weights in place, so merge a copy and keep training the original.
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    write_remote_code(out_dir)
    logger.info("saved report generator to %s", out_dir)
    return out_dir


def adapter_base(model: PeftModel, adapter_dir: Path) -> str:
    """The absolute path of a folder holding the adapter's base weights.

    A base loaded from a folder (RL on an SFT export) is that folder; a base assembled in memory (SFT: LLM + encoder
    + new projector) is saved to ``adapter_dir/base`` first, since no folder holds it.
    """
    name = model.peft_config[model.active_adapter].base_model_name_or_path
    if name and (Path(name) / "config.json").is_file():
        return str(Path(name).resolve())
    base_dir = adapter_dir / "base"
    # unload() strips the LoRA layers without merging them; it rewrites modules, hence the copy.
    copy.deepcopy(model).unload().save_pretrained(base_dir)
    return str(base_dir.resolve())


def _relative_adapter_base(adapter_dir: Path) -> None:
    """Rewrites the saved adapter's base as a path relative to the adapter: an absolute one would name the training
    machine's folders in the export and break when the run root moves (the live model keeps the absolute path, valid
    in this process whatever its working directory)."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    base = config["base_model_name_or_path"]
    config["base_model_name_or_path"] = Path(os.path.relpath(base, adapter_dir.resolve())).as_posix()
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    # peft's template card repeats the base's absolute path and says nothing the export's own card does not.
    (adapter_dir / "README.md").unlink(missing_ok=True)


def save_generator(generator: ReportGenerator, out_dir: str | Path) -> Path:
    """:func:`save_rrg` export (merged weights, processor, remote code) of ``generator``'s model, plus ``prompting/``
    (settings, bank with its context images, clue head) and the model card ``README.md``; what
    ``ReportGenerator.from_export`` loads.

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = save_rrg(generator.model, generator.processor, out_dir)
    prompting_dir = out_dir / PROMPTING_DIR
    prompting_dir.mkdir(exist_ok=True)
    save_config(generator.prompting, prompting_dir / SETTINGS_FILE)
    if generator.retriever is not None:
        generator.retriever.save(prompting_dir)
    if generator.clue_head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in generator.clue_head.state_dict().items()},
                  prompting_dir / CLUE_HEAD_FILE)
        in_dim = generator.clue_head.net[0].normalized_shape[0]
        (prompting_dir / CLUE_HEAD_META).write_text(json.dumps({"in_dim": in_dim}))
    write_model_card(out_dir)
    return out_dir
