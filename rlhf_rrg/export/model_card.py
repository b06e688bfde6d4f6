"""The model card (``README.md``) of an export, written from the files a run leaves, never from memory.

Sources, each optional except ``config.json``: the export's ``config.json`` (LLM and encoder), ``prompting/``
(context retrieval, whether reports/images travel with it), the lineage its marker records (each stage's resolved
config: dataset, LLM, reward, algorithm; for an export still being written, or marked before markers recorded it, the
configs of its run root) and ``<run_root>/eval/<stage>/scores.json`` written by ``rlhf_rrg.evaluate_run`` (the eval
table), shown only when those scores name this export's id: an earlier export of the stage left them otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from rlhf_rrg.marker import export_id
from rlhf_rrg.prompting.prompts import build_context_prompt
from rlhf_rrg.retrieval.context import PromptTemplate
from rlhf_rrg.runroot import export_lineage

CARD_FILE = "README.md"


def read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def config_value(data: Mapping[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data


def stage_lineage(export_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(stage, resolved config)`` from the first stage of the run to the one that wrote ``export_dir``
    (:func:`rlhf_rrg.runroot.export_lineage`; weights of unknown history are left out, a missing config is empty)."""
    return [(entry["stage"], entry.get("config") or {}) for entry in export_lineage(export_dir) if entry.get("stage")]


def _describe_stage(stage: str, config: Mapping[str, Any]) -> str:
    facts = {
        "sft": [("LLM", "model.llm"), ("LoRA", "model.lora.enabled"), ("context", "prompting.context.mode")],
        "ppo": [("algorithm", "algo"), ("reward", "reward.funcs"), ("LoRA", "lora.enabled")],
    }.get(stage, [])
    parts = [f"{name} {config_value(config, key)}" for name, key in facts if config_value(config, key) is not None]
    dataset = config_value(config, "data.dataset")
    return f"- **{stage}**" + (f" on `{dataset}`" if dataset else "") + (f": {', '.join(parts)}" if parts else "")


def _base_llm(export_dir: Path, lineage: list[tuple[str, dict[str, Any]]]) -> str:
    text = json.loads((export_dir / "config.json").read_text())["text_config"]
    shape = f"{text.get('model_type')}, {text.get('num_hidden_layers')} layers, hidden size {text.get('hidden_size')}"
    for _, config in lineage:
        path = config_value(config, "model.llm_path")
        if path:
            # The folder's name only: the absolute path of the training machine means nothing to a reader.
            return f"`{Path(str(path)).name}` ({shape})"
        if config_value(config, "model.llm"):
            return f"`{config_value(config, 'model.llm')}` ({shape})"
    return f"({shape})"


def _eval_table(scores: Mapping[str, Any]) -> str:
    rows = [(k, v) for k, v in sorted(scores.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not rows:
        return ""
    return "| metric | value |\n|---|---|\n" + "".join(
        f"| {k} | {v:.4f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in rows
    )


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _prompting_section(export_dir: Path) -> str:
    settings = read_yaml(export_dir / "prompting" / "prompting.yaml")
    mode = config_value(settings, "context.mode") or "none"
    residual = ", residual features" if config_value(settings, "context.residual") else ""
    if mode == "none":
        return ("No retrieved context: the prompt is the image(s) and the instruction, as below "
                "(`model.generate_reports(processor, [image])` builds it for you).\n")
    meta_path = export_dir / "prompting" / "memory_bank.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    reports = "stores the reports of its studies" if "reports" in meta else "stores no report text"
    return (
        f"Context: `{mode}` retrieval of {config_value(settings, 'context.k_pos')} abnormal and "
        f"{config_value(settings, 'context.k_neg')} normal training studies per query (R2GenCSR"
        f"{residual}). The memory bank in `prompting/` "
        f"holds {len(meta.get('ids', []))} studies' image embeddings, one resized image each, and {reports}. "
        "`model.generate(...)` alone (below) runs without that context: use `model.generate_reports(processor, "
        "[image])`, which retrieves and prompts exactly as in training.\n"
    )


def _evaluation_section(export_dir: Path, stage: str | None) -> str:
    """The eval table of ``<run_root>/eval/<stage>/scores.json`` when its ``export_id`` is this export's."""
    run_root = export_dir.parent.parent
    scores_path = run_root / "eval" / stage / "scores.json" if stage else None
    scores = json.loads(scores_path.read_text()) if scores_path is not None and scores_path.is_file() else {}
    table = _eval_table(_flat(scores))
    if not table:
        return "No evaluation recorded yet (run `python -m rlhf_rrg.evaluate_run`).\n"
    shown = scores_path.relative_to(run_root)
    if scores.get("export_id") is None or scores["export_id"] != export_id(export_dir):
        return (f"No evaluation of this export yet: {shown} holds the scores of another export of the stage "
                "(run `python -m rlhf_rrg.evaluate_run`).\n")
    return f"Scores from `rlhf_rrg.evaluate_run` ({shown}):\n\n{table}"


def render_model_card(export_dir: str | Path) -> str:
    """The card's Markdown (with Hub YAML metadata) for the export in ``export_dir``."""
    export_dir = Path(export_dir)
    lineage = stage_lineage(export_dir)
    vision = json.loads((export_dir / "config.json").read_text())["vision_config"]
    stage = lineage[-1][0] if lineage else None
    datasets = sorted({str(config_value(c, "data.dataset")) for _, c in lineage if config_value(c, "data.dataset")})
    settings = read_yaml(export_dir / "prompting" / "prompting.yaml")
    template = PromptTemplate(**(config_value(settings, "context.template") or {}))
    prompt = build_context_prompt([], [], None, template, num_query_images=config_value(settings, "views") or 1)
    front = {"library_name": "transformers", "pipeline_tag": "image-text-to-text",
             "tags": ["radiology-report-generation", "chest-x-ray", "rlhf-rrg", "custom_code"]}
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        "# Chest X-ray report generator (rlhf-rrg)", "",
        "A LLaVA-style model (vision encoder, two-layer projector, causal LM) trained with the rlhf-rrg framework.",
        "",
        f"- **Base LLM**: {_base_llm(export_dir, lineage)}",
        f"- **Vision encoder**: `{vision.get('encoder_type')}`, {vision.get('image_size')} px, patch "
        f"{vision.get('patch_size')}, width {vision.get('hidden_size')}, depth {vision.get('num_hidden_layers')}",
        f"- **Data**: {', '.join(f'`{d}`' for d in datasets) if datasets else 'not recorded'}", "",
        "## Training stages", "",
        *([_describe_stage(s, c) for s, c in lineage] or ["Not recorded (no stage config beside the export)."]), "",
        "## Evaluation", "",
        _evaluation_section(export_dir, stage),
        "## Prompting", "", _prompting_section(export_dir),
        "## Use with transformers", "",
        "```python",
        "from PIL import Image",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        'model = AutoModelForImageTextToText.from_pretrained("PATH", trust_remote_code=True)',
        'processor = AutoProcessor.from_pretrained("PATH", trust_remote_code=True)',
        f"prompt = processor.format_prompt({prompt!r})",
        'inputs = processor(images=Image.open("cxr.png"), text=prompt, return_tensors="pt")',
        "report_ids = model.generate(**inputs, max_new_tokens=100)[:, inputs['input_ids'].shape[1]:]",
        "print(processor.tokenizer.decode(report_ids[0], skip_special_tokens=True))",
        "# or, with the retrieved context and clues of training (prompting/):",
        'print(model.generate_reports(processor, [Image.open("cxr.png")], max_new_tokens=100)[0])',
        "```", "",
        "The code this needs (`modeling_rrg.py`, the encoder with its pure-torch selective scan, the processor and "
        "the prompting code) ships with the weights; it needs torch, transformers, peft, safetensors, pyyaml and "
        "Pillow. Generated reports are not a diagnosis.", "",
    ]
    return "\n".join(lines)


def write_model_card(export_dir: str | Path) -> Path:
    """Writes ``export_dir/README.md``; returns its path."""
    path = Path(export_dir) / CARD_FILE
    path.write_text(render_model_card(export_dir))
    return path
