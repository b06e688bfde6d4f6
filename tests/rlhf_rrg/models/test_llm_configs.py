"""Any Hugging Face causal LM by local path: width from its config, shortcuts checked, bad folders named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from rlhf_rrg.models.llm_configs import check_llm_path
from rlhf_rrg.models.rrg import RRGModelConfig, build_processor, build_rrg_model
from rlhf_rrg.testing.tiny_llm import TINY_FAMILIES, write_tiny_llm
from rlhf_rrg.testing.tiny_models import TINY_PROMPT, TINY_REPORTS


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_any_family_is_grafted_with_its_own_width(tmp_path, family):
    folder = write_tiny_llm(tmp_path / family, family, [*TINY_REPORTS, TINY_PROMPT], hidden_size=40)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cfg = RRGModelConfig(vision="tiny-vit", llm=f"my-{family}", llm_path=str(folder))
    model = build_rrg_model(cfg, tokenizer)
    assert model.config.text_config.model_type == family
    assert model.config.text_config.hidden_size == 40
    saved = load_file(folder / "model.safetensors")
    torch.testing.assert_close(model.model.language_model.norm.weight, saved["model.norm.weight"])
    batch = build_processor(model, tokenizer).build_sft_batch([TINY_PROMPT], [TINY_REPORTS[0]],
                                                              torch.randn(1, 3, 64, 64))
    assert torch.isfinite(model(**batch).loss)


def test_folder_problems_are_named(tmp_path):
    with pytest.raises(ValueError, match="MUST_BE_SET/config.json does not exist"):
        check_llm_path("llama-3.1-8b", "MUST_BE_SET")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 768}))
    with pytest.raises(ValueError, match="model_type 'vit' is not a causal LM"):
        check_llm_path("vit-base", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 2048}))
    assert check_llm_path("qwen3-1.7b", tmp_path) == tmp_path
    with pytest.raises(ValueError, match=r"'qwen2.5-1.5b' is \('qwen2', 1536\)"):
        check_llm_path("qwen2.5-1.5b", tmp_path)
    with pytest.raises(ValueError, match="takes no llm_path"):
        check_llm_path("tiny", tmp_path)
