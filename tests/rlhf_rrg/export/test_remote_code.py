"""Exports load and generate in plain transformers (trust_remote_code) where rlhf_rrg cannot be imported."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rlhf_rrg.export.remote_code import AUTO_MAP, remote_sources
from rlhf_rrg.models.generator import PromptingConfig, ReportGenerator
from rlhf_rrg.retrieval.context import PromptTemplate, build_context_prompt
from rlhf_rrg.testing.tiny_models import tiny_rrg

# Runs in a fresh interpreter: -I drops PYTHONPATH, the cwd and user site; the finder below also stops the
# editable install, so any import of the package (directly or from the export's code) fails loudly.
ISOLATED = r"""
import importlib.abc, json, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("rlhf_rrg", "rewards"):
            raise ModuleNotFoundError(f"blocked import of {name}")
        return None

sys.meta_path.insert(0, Blocker())
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

export, image_path, prompt = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
inputs = processor(images=Image.open(image_path), text=processor.format_prompt(prompt), return_tensors="pt")
ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)[:, inputs["input_ids"].shape[1]:]
print(json.dumps({
    "report": processor.tokenizer.decode(ids[0], skip_special_tokens=True),
    "model": type(model).__module__,
    "leaked": sorted(m for m in sys.modules if m.split(".")[0] in ("rlhf_rrg", "rewards")),
}))
"""


def test_sources_import_nothing_from_the_package():
    sources = remote_sources()
    assert {"modeling_rrg.py", "processor.py", "vision.py", "mamba.py", "scan.py", "vit.py"} <= set(sources)
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] not in ("rlhf_rrg", "rewards"), (name, node.module)
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert f"{node.module}.py" in sources, (name, node.module)


@pytest.mark.parametrize("encoder", ["vim"])
def test_export_generates_in_plain_transformers_without_the_package(tmp_path, encoder):
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path, encoder)
    generator = ReportGenerator(tiny.model, tiny.processor, PromptingConfig()).eval()
    export = generator.save(tmp_path / "export")
    config = json.loads((export / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["vision_config"]["model_type"] == "rrg_vision"
    image = Image.fromarray((np.random.default_rng(0).random((90, 70)) * 255).astype(np.uint8))
    image.save(tmp_path / "cxr.png")
    # What training prompts with for a study without retrieved context (and what the model card tells users to use).
    prompt = build_context_prompt([], [], None, PromptTemplate())
    pixels = tiny.processor.preprocess_image(Image.open(tmp_path / "cxr.png"))
    expected = ReportGenerator.from_export(export).generate(pixels[None, None], max_new_tokens=12)[0]
    assert expected.strip()

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED, str(export), str(tmp_path / "cxr.png"), prompt],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["leaked"] == []
    assert result["model"].startswith("transformers_modules.")
    assert result["report"] == expected
