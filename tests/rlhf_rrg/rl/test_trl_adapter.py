"""Prompt parity of the TRL path: what TRL's GRPO/RLOO feed the model equals what our loop feeds it for a study.

Studies are IU-Xray layout (two views each, one view a 16-bit PNG), prompted with TRRG clue text, tokenized with a
byte-level BPE (whitespace-sensitive, with a BOS token, like Llama/Qwen) so a moved placeholder, a dropped space or
newline changes the ids.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import processors
from tokenizers.implementations import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from rewards.nlg import BleuReward
from rewards.observations import CHEXPERT_14
from rlhf_rrg.data.dataset import DataConfig, build_dataset
from rlhf_rrg.models.disease_clues import DiseaseClueConfig, DiseaseClueHead
from rlhf_rrg.models.rrg import LoraSettings, RRGModelConfig, build_processor, build_rrg_model
from rlhf_rrg.optim import OptimConfig
from rlhf_rrg.prompting.generator import PromptingConfig, ReportGenerator
from rlhf_rrg.retrieval.context import PromptTemplate
from rlhf_rrg.retrieval.context_dataset import ContextDataset, collate_context
from rlhf_rrg.rl.rollout import GenerationConfig
from rlhf_rrg.rl.trl_adapter import GroupConfig, prompt_blocks, run_trl, trl_dataset
from rlhf_rrg.runroot import StageDirs
from rlhf_rrg.testing.fixtures import IU_REPORTS, write_iu_xray_fixture

SAMPLES = 2


@pytest.fixture(scope="module")
def iu_root(tmp_path_factory) -> Path:
    """The IU-Xray fixture with the first study's frontal view rewritten as a full-range 16-bit PNG."""
    paths = write_iu_xray_fixture(tmp_path_factory.mktemp("iu"))
    first = paths.image_root / "CXR0_IM-1000" / "0.png"
    ramp = np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16)
    Image.fromarray(ramp).save(first)
    with Image.open(first) as img:
        assert img.mode.startswith("I") and np.asarray(img).max() > 255  # really 16-bit: convert("L") saturates it
    return paths.annotation_path.parent


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    words = [*IU_REPORTS, PromptTemplate().instruction, "findings suggest: no finding", *CHEXPERT_14]
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator([w.lower() for w in words] * 4, vocab_size=500, min_frequency=1,
                            special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def tiny_generator(views: int) -> ReportGenerator:
    torch.manual_seed(0)
    tokenizer = bpe_tokenizer()
    model = build_rrg_model(RRGModelConfig(vision="tiny-vit"), tokenizer)
    head = DiseaseClueHead(model.config.vision_config.hidden_size, 0, 0.0)
    # Large random weights, so the near-identical tiny features of different studies give different clue texts.
    torch.nn.init.normal_(head.net[-1].weight, std=3.0)
    prompting = PromptingConfig(clues=DiseaseClueConfig(enabled=True, dropout=0.0, threshold=0.5), views=views)
    return ReportGenerator(model, build_processor(model, tokenizer), prompting, None, head).eval()


def train_data(root: Path, views: int, size: int) -> ContextDataset:
    cfg = DataConfig(annotation_path=root / "annotation.json", image_root=root / "images", image_size=size,
                     views=views)
    return ContextDataset(build_dataset(cfg, "train", train=False))


class ModelInputs:
    """Records the tensors ``model.generate`` and the training/log-prob forwards (outside generate) receive.

    The forwards are caught on the LLaVA backbone (``model.model``): TRL replaces the top-level forward by a fused
    LM head that calls the backbone itself.
    """

    KEYS = ("input_ids", "attention_mask", "pixel_values")

    def __init__(self, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.generate: list[dict[str, torch.Tensor]] = []
        self.forward: list[dict[str, torch.Tensor]] = []
        self._generating = False
        generate, forward = model.generate, model.model.forward

        @functools.wraps(generate)
        def recording_generate(*args: Any, **kwargs: Any) -> Any:
            self.generate.append(self._take(kwargs))
            self._generating = True
            try:
                return generate(*args, **kwargs)
            finally:
                self._generating = False

        @functools.wraps(forward)
        def recording_forward(*args: Any, **kwargs: Any) -> Any:
            if not self._generating:
                self.forward.append(self._take(kwargs))
            return forward(*args, **kwargs)

        monkeypatch.setattr(model, "generate", recording_generate)
        monkeypatch.setattr(model.model, "forward", recording_forward)

    def _take(self, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {key: kwargs[key].detach().cpu() for key in self.KEYS}


def rows(call: dict[str, torch.Tensor], views: int):
    """Per row: where the left padding ends, the row's ids and mask, and its ``views`` images."""
    for r, (ids, mask) in enumerate(zip(call["input_ids"], call["attention_mask"], strict=True)):
        start = int(mask.argmax())
        assert not mask[:start].any()
        yield start, ids, mask, call["pixel_values"][r * views : (r + 1) * views]


def study_of(pixels: torch.Tensor, ours: list[dict[str, torch.Tensor]]) -> int:
    matches = [j for j, inputs in enumerate(ours) if torch.equal(inputs["pixel_values"], pixels)]
    assert len(matches) == 1, f"TRL's images match studies {matches}, not exactly one"
    return matches[0]


@pytest.mark.parametrize(("algo", "views"), [("grpo", 1), ("grpo", 2), ("rloo", 2)])
def test_trl_feeds_the_model_our_prompts_and_pixels(iu_root, tmp_path, monkeypatch, algo, views):
    generator = tiny_generator(views)
    data = train_data(iu_root, views, generator.image_size)
    with torch.no_grad():
        ours = [{k: v.cpu() for k, v in generator.generation_inputs(collate_context([data[j]])).items()}
                for j in range(len(data))]
    pad = generator.processor.tokenizer.pad_token_id
    assert all(inputs["pixel_values"].shape[0] == views for inputs in ours)
    assert len({inputs["input_ids"].shape[1] for inputs in ours}) > 1  # clue texts differ: TRL must left-pad
    recorded = ModelInputs(generator.model, monkeypatch)

    run_trl(algo, generator, tmp_path / "sft", data, BleuReward(), 0.0, GroupConfig(backend="trl", beta=0.0),
            GenerationConfig(max_new_tokens=4, num_samples=SAMPLES), LoraSettings(enabled=False), True,
            OptimConfig(lr=1e-3, schedule="constant"), 1, SAMPLES * len(data), 0, StageDirs(tmp_path, "ppo"))

    assert recorded.generate and recorded.forward
    seen: Counter[int] = Counter()
    for call in recorded.generate:
        for start, ids, mask, pixels in rows(call, views):
            j = study_of(pixels, ours)
            seen[j] += 1
            assert torch.equal(ids[start:], ours[j]["input_ids"][0]), f"{algo}: study {j}'s prompt ids differ"
            assert mask[start:].all() and (ids[:start] == pad).all()
    assert seen == Counter({j: SAMPLES for j in range(len(data))})
    for call in recorded.forward:  # prompt + completion: the prompt part is ours
        for start, ids, _, pixels in rows(call, views):
            expected = ours[study_of(pixels, ours)]["input_ids"][0]
            assert torch.equal(ids[start : start + len(expected)], expected)


def test_prompt_blocks_render_back_to_the_sft_prompt(iu_root):
    generator = tiny_generator(views=2)
    data = train_data(iu_root, 2, generator.image_size)
    processor, token = generator.processor, generator.processor.image_token
    dataset = trl_dataset(generator, data)
    batch = collate_context([data[0]])
    prompt = generator.prompts(batch, generator.clue_logits(batch["pixel_values"]))[0]
    assert prompt.startswith("findings suggest: ") and prompt.count(token) == 2
    row = dataset[0]
    assert row["prompt"][0]["content"][0]["type"] == "text"  # the clue text stays before the images
    rendered = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert rendered == processor.format_prompt(prompt, 2)
    assert torch.equal(torch.stack(row["images"]), batch["pixel_values"][0])
    assert prompt_blocks(f"a{token}{token} b", token) == [
        {"type": "text", "text": "a"}, {"type": "image"}, {"type": "image"}, {"type": "text", "text": " b"}]


def test_trl_dataset_rejects_views_the_export_does_not_take(iu_root):
    generator = tiny_generator(views=1)
    with pytest.raises(ValueError, match="data.views=2 but the export takes prompting.views=1"):
        trl_dataset(generator, train_data(iu_root, 2, generator.image_size))
