"""The model card is written from the run's own files: LLM, data, stages, reward, eval table, prompt."""

from __future__ import annotations

import json

import yaml

from rlhf_rrg.export.model_card import render_model_card, stage_lineage
from rlhf_rrg.retrieval.context import PromptTemplate, build_context_prompt


def test_card_describes_the_run(make_run):
    run = make_run("iu_xray")
    export = run / "ppo" / "export"
    assert [stage for stage, _ in stage_lineage(export)] == ["sft", "ppo"]
    card = (export / "README.md").read_text()  # written by ReportGenerator.save
    front = yaml.safe_load(card.split("---")[1])
    assert front["pipeline_tag"] == "image-text-to-text" and front["library_name"] == "transformers"
    card = render_model_card(export)  # now with the eval scores written after the export
    llm_path = yaml.safe_load((run / "sft" / "config.yaml").read_text())["model"]["llm_path"]
    assert "`Qwen2.5-1.5B-Instruct` (llama" in card and llm_path not in card  # the folder name, not the local path
    assert "**Data**: `iu_xray`" in card
    assert "- **sft** on `iu_xray`: LLM qwen2.5-1.5b, LoRA True, context retrieved" in card
    assert "- **ppo** on `iu_xray`: algorithm ppo, reward ['radcliq_v1']" in card
    for metric, value in json.loads((run / "eval" / "ppo" / "scores.json").read_text())["scores"].items():
        assert f"| scores/{metric} | {value:.4f} |" in card
    assert repr(build_context_prompt([], [], None, PromptTemplate())) in card
    assert "trust_remote_code=True" in card


def test_card_without_run_files_still_names_the_model(make_run, tmp_path):
    export = make_run("iu_xray") / "sft" / "export"
    (export.parent / "config.yaml").unlink()
    card = render_model_card(export)
    assert "Not recorded" in card and "No evaluation recorded yet" in card and "(llama, 2 layers" in card
