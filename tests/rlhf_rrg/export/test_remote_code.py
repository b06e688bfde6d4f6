"""Exports load and generate in plain transformers (trust_remote_code) where rlhf_rrg cannot be imported."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from rlhf_rrg.data.dataset import DataConfig, build_dataset
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.export.modeling_rrg import RRGLlavaForConditionalGeneration
from rlhf_rrg.export.remote_code import AUTO_MAP, remote_sources
from rlhf_rrg.export.save import save_generator
from rlhf_rrg.models.disease_clues import DiseaseClueConfig, DiseaseClueHead
from rlhf_rrg.prompting.generator import PromptingConfig, ReportGenerator
from rlhf_rrg.prompting.prompts import build_context_prompt
from rlhf_rrg.retrieval.context import ContextConfig, PromptTemplate
from rlhf_rrg.retrieval.context_dataset import ContextDataset, collate_context
from rlhf_rrg.retrieval.retriever import ContextRetriever
from rlhf_rrg.testing.tiny_models import tiny_rrg

SIZE = 64  # the tiny encoders' image size

# Runs in a fresh interpreter: -I drops PYTHONPATH, the cwd and user site; the finder below also stops the
# editable install, so any import of the package (directly or from the export's code) fails loudly.
BLOCKED = r"""
import importlib.abc, json, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("rlhf_rrg", "rewards"):
            raise ModuleNotFoundError(f"blocked import of {name}")
        return None

sys.meta_path.insert(0, Blocker())
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
"""
ISOLATED = BLOCKED + r"""
export, image_path, prompt = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
inputs = processor(images=Image.open(image_path), text=processor.format_prompt(prompt), return_tensors="pt")
ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)[:, inputs["input_ids"].shape[1]:]
print(json.dumps({
    "report": processor.tokenizer.decode(ids[0], skip_special_tokens=True),
    "prompted": model.generate_reports(processor, [Image.open(image_path)], max_new_tokens=12)[0],
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


def context_generator(tmp_path, tiny, k_pos: int = 1, k_neg: int = 1) -> ReportGenerator:
    """Wired like stages/sft.py: retrieved context with residual features and disease clues, bank from data files."""
    root = tmp_path / "data"
    write_synthetic_dataset(root, SyntheticConfig(n_train=10, n_val=1, n_test=0, image_size=SIZE, seed=2))
    data = DataConfig(annotation_path=root / "annotation.json", image_root=root / "images", image_size=SIZE)
    train = build_dataset(data, "train", train=False)
    context = ContextConfig(mode="retrieved", k_pos=k_pos, k_neg=k_neg, residual=True)
    batches = (
        {"pixel_values": b["pixel_values"], "id": b["ids"], "report": b["reports"], "labels": b["labels"]}
        for b in DataLoader(ContextDataset(train), batch_size=8, collate_fn=collate_context)
    )
    paths = [[str(p) for p in s.image_paths] for s in train.studies]
    vision = tiny.model.model.vision_tower
    retriever = ContextRetriever.build(context, vision, batches, paths, SIZE, data.mean, data.std)
    clues = DiseaseClueConfig(enabled=True, dropout=0.0, threshold=0.5)
    prompting = PromptingConfig(context=context, clues=clues)
    head = DiseaseClueHead(vision.config.hidden_size, 0, 0.0)
    return ReportGenerator(tiny.model, tiny.processor, prompting, retriever, head).eval()


@pytest.mark.parametrize("context", [False, True])
def test_export_generates_in_plain_transformers_without_the_package(tmp_path, context):
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path, "vim")
    if context:
        generator = context_generator(tmp_path, tiny)
    else:
        generator = ReportGenerator(tiny.model, tiny.processor, PromptingConfig()).eval()
    export = save_generator(generator, tmp_path / "export")
    config = json.loads((export / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["vision_config"]["model_type"] == "rrg_vision"
    image = Image.fromarray((np.random.default_rng(0).random((90, 70)) * 255).astype(np.uint8))
    image.save(tmp_path / "cxr.png")
    # What training prompts with for a study without retrieved context (and what the model card tells users to use).
    prompt = build_context_prompt([], [], None, PromptTemplate())
    pixels = tiny.processor.preprocess_image(Image.open(tmp_path / "cxr.png"))
    expected = ReportGenerator.from_export(export).generate(pixels[None, None], max_new_tokens=12)[0]
    assert expected.strip()
    if context:
        shutil.rmtree(tmp_path / "data")  # the context images travel with the export

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
    assert result["prompted"] == expected
    if not context:
        assert result["report"] == expected


def test_generate_reports_takes_each_study_as_its_views(tmp_path):
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path)
    export = save_generator(ReportGenerator(tiny.model, tiny.processor, PromptingConfig(views=2)).eval(),
                            tmp_path / "export")
    rng = np.random.default_rng(1)
    studies = [[Image.fromarray((rng.random((80, 80)) * 255).astype(np.uint8)) for _ in range(2)] for _ in range(2)]
    pixels = torch.stack([torch.stack([tiny.processor.preprocess_image(v) for v in views]) for views in studies])
    expected = ReportGenerator.from_export(export).generate(pixels, max_new_tokens=8)
    model = RRGLlavaForConditionalGeneration.from_pretrained(export).eval()
    assert model.generate_reports(tiny.processor, studies, max_new_tokens=8) == expected


def test_generate_reports_keeps_the_models_train_mode(tmp_path):
    tiny = tiny_rrg(tmp_path)
    export = save_generator(ReportGenerator(tiny.model, tiny.processor, PromptingConfig()).eval(), tmp_path / "export")
    model = RRGLlavaForConditionalGeneration.from_pretrained(export).train()
    model.generate_reports(tiny.processor, torch.zeros(1, 1, 3, SIZE, SIZE), max_new_tokens=2)
    assert all(module.training for module in model.modules())


# Calls, in the given order, plain ``generate`` on n images (one study each, no context) and ``generate_reports`` on
# one study; each plain call also returns its next-token logits, which a hook left behind would change.
IN_ORDER = BLOCKED + r"""
export, order, *paths = sys.argv[1:]
images = [Image.open(p) for p in paths]
model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
projector = model.model.multi_modal_projector

def plain(n):
    inputs = processor(images=images[:n], text=[processor.format_prompt("describe")] * n, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    return {"reports": processor.tokenizer.batch_decode(ids, skip_special_tokens=True), "logits": logits.tolist()}

calls = []
for call in order.split(","):
    out = model.generate_reports(processor, images[:1], max_new_tokens=6) if call == "reports" else plain(int(call))
    calls.append({"call": call, "out": out, "hooks": len(projector._forward_pre_hooks), "training": model.training})
print(json.dumps(calls))
"""


def test_generate_and_generate_reports_leave_the_model_as_found_in_any_order(tmp_path):
    """A residual-context export (1 context + 1 query image per prompt): ``generate_reports`` used to hook the
    projector for good, so a later plain ``generate`` on 1 image failed and on 2 images mixed their features."""
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path)
    export = save_generator(context_generator(tmp_path, tiny, k_pos=1, k_neg=0), tmp_path / "export")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"cxr{i}.png")
        Image.fromarray((rng.random((80, 80)) * 255).astype(np.uint8)).save(paths[-1])
    pixels = tiny.processor.preprocess_image(Image.open(paths[0]))[None, None]
    expected = ReportGenerator.from_export(export).generate(pixels, max_new_tokens=6)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    runs = {}
    for order in ("2,1,reports,2,1,reports", "reports,1,2,reports,2,1"):
        done = subprocess.run([sys.executable, "-I", "-c", IN_ORDER, str(export), order, *map(str, paths)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[order] = json.loads(done.stdout.strip().splitlines()[-1])
    calls = [c for run in runs.values() for c in run]
    assert all(c["hooks"] == 0 and not c["training"] for c in calls)
    assert all(c["out"] == expected for c in calls if c["call"] == "reports")
    for n in ("1", "2"):
        plain = [c["out"] for c in calls if c["call"] == n]
        assert len(plain) == 4 and all(out == plain[0] for out in plain), n  # logits equal to the last bit
