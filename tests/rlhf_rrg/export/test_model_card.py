"""The model card is written from the run's own files: LLM, data, stages, reward, eval table, prompt."""

from __future__ import annotations

import json
import shutil

import yaml
from safetensors.torch import load_file, save_file

from rlhf_rrg.export.model_card import render_model_card, stage_lineage
from rlhf_rrg.prompting.prompts import build_context_prompt
from rlhf_rrg.retrieval.context import PromptTemplate
from rlhf_rrg.runroot import EXPORT_MARKER, writing_export


def test_card_describes_the_run(make_run):
    run = make_run("iu_xray")
    export = run / "ppo" / "export"
    assert [stage for stage, _ in stage_lineage(export)] == ["sft", "ppo"]
    card = (export / "README.md").read_text()  # written by save_generator
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


def test_card_of_an_export_copied_out_of_its_run_reads_its_marker(make_run, tmp_path):
    run = make_run("iu_xray")
    copy = tmp_path / "shared" / "export"
    shutil.copytree(run / "ppo" / "export", copy)
    shutil.rmtree(run)
    card = render_model_card(copy)
    assert "**Data**: `iu_xray`" in card and "`Qwen2.5-1.5B-Instruct` (llama" in card
    assert "- **sft** on `iu_xray`: LLM qwen2.5-1.5b" in card and "- **ppo** on `iu_xray`: algorithm ppo" in card
    assert "No evaluation recorded yet" in card


def test_card_without_any_record_still_names_the_model(make_run):
    export = make_run("iu_xray") / "sft" / "export"
    (export.parent / "config.yaml").unlink()
    (export / EXPORT_MARKER).write_text(json.dumps({"stage": "sft"}))  # marked before markers recorded lineage
    card = render_model_card(export)
    assert "**Data**: not recorded" in card and "No evaluation recorded yet" in card and "(llama, 2 layers" in card


def test_card_shows_only_the_scores_of_its_own_export(make_run):
    run = make_run("iu_xray")
    export, scores_path = run / "ppo" / "export", run / "eval" / "ppo" / "scores.json"
    assert "| scores/bleu_4 | 0.1250 |" in render_model_card(export)
    # A new ppo export (--run.overwrite clears ppo/ only) meets the scores of the previous model.
    with writing_export(export, {"stage": "ppo"}) as out:
        shutil.copytree(export, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(EXPORT_MARKER))
        weights = {name: tensor + 1 for name, tensor in load_file(out / "model.safetensors").items()}
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    card = render_model_card(export)
    assert "scores/bleu_4" not in card and "eval/ppo/scores.json holds the scores of another export" in card
    scores = json.loads(scores_path.read_text())
    del scores["export_id"]  # written before scores named their export
    scores_path.write_text(json.dumps(scores))
    assert "scores/bleu_4" not in render_model_card(export)
