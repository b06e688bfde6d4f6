"""A run root as the stages leave it: ``<run>/{sft,ppo}/{config.yaml, export/}`` and ``<run>/eval/ppo/scores.json``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_rrg.export.save import save_generator
from rlhf_rrg.marker import export_id
from rlhf_rrg.prompting.generator import PromptingConfig, ReportGenerator
from rlhf_rrg.runroot import mark_export_complete
from rlhf_rrg.testing.tiny_models import tiny_rrg

CONFIGS = Path(__file__).resolve().parents[3] / "stages" / "configs"
LLM_PATH = "/models/Qwen2.5-1.5B-Instruct"
SCORES = {"stage": "ppo", "n": 3, "scores": {"bleu_4": 0.125, "ce/micro_f1_14": 0.25}}


@pytest.fixture(scope="module")
def make_run(tmp_path_factory):
    """``make_run(dataset)`` -> run root with sft and ppo exports of one tiny generator and ppo eval scores (of that
    ppo export, as ``rlhf_rrg.evaluate_run`` writes them)."""
    template = tmp_path_factory.mktemp("template")
    torch.manual_seed(0)
    tiny = tiny_rrg(template)
    generator = ReportGenerator(tiny.model, tiny.processor, PromptingConfig()).eval()
    for stage in ("sft", "ppo"):
        save_generator(generator, template / stage)

    def make(dataset: str) -> Path:
        run = tmp_path_factory.mktemp(dataset)
        for stage in ("sft", "ppo"):
            config = yaml.safe_load((CONFIGS / stage / f"{dataset}.yaml").read_text())
            if stage == "sft":
                config["model"]["llm_path"] = LLM_PATH
            (run / stage).mkdir()
            (run / stage / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            shutil.copytree(template / stage, run / stage / "export")
            mark_export_complete(run / stage / "export", {"stage": stage})
        (run / "eval" / "ppo").mkdir(parents=True)
        scores = {**SCORES, "export_id": export_id(run / "ppo" / "export")}
        (run / "eval" / "ppo" / "scores.json").write_text(json.dumps(scores))
        return run

    return make
