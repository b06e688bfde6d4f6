"""ReportGenerator: prompt/image layout, the self-refine query mask, the SFT loss terms, export round trip."""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass

import pytest
import torch
from torch.utils.data import DataLoader

from rewards.clinical import ce_metrics
from rewards.labeler import RuleLabeler
from rewards.observations import CHEXPERT_14, POSITIVE
from rlhf_rrg.data.dataset import DataConfig, ReportDataset, build_dataset
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.export.save import save_generator
from rlhf_rrg.losses.finding_weighted import finding_spans, weighted_lm_loss
from rlhf_rrg.losses.self_refine import SelfRefineConfig, self_refining_loss
from rlhf_rrg.losses.sft import LMLossConfig, query_image_mask, sft_loss
from rlhf_rrg.losses.unlikelihood import unlikelihood_loss
from rlhf_rrg.models.disease_clues import DiseaseClueConfig, DiseaseClueHead, best_thresholds
from rlhf_rrg.models.rrg import (
    LoraSettings,
    RRGModelConfig,
    apply_lora,
    build_processor,
    build_rrg_model,
    build_vision_model,
)
from rlhf_rrg.models.tokenizer import build_word_tokenizer
from rlhf_rrg.probe import (
    clue_predictions,
    clue_probabilities,
    fit_logistic_probe,
    probe_probabilities,
    refit_clue_head,
    study_features,
    tune_clue_thresholds,
)
from rlhf_rrg.prompting.generator import PromptingConfig, ReportGenerator
from rlhf_rrg.prompting.rerank import ClueRerankConfig, rouge_l
from rlhf_rrg.retrieval.context import ContextConfig, PromptTemplate
from rlhf_rrg.retrieval.context_dataset import ContextDataset, collate_context
from rlhf_rrg.retrieval.retriever import ContextRetriever, dataset_neighbours
from rlhf_rrg.testing.tiny_models import TINY_REPORTS, tiny_rrg

SIZE = 64
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
K_POS, K_NEG = 2, 1
INSTRUCTION = PromptTemplate().instruction


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, SyntheticConfig(n_train=12, n_val=4, n_test=2, image_size=SIZE, views=2, seed=3))
    return root


def split(root, name: str, views: int) -> ReportDataset:
    cfg = DataConfig(
        annotation_path=root / "annotation.json",
        image_root=root / "images",
        image_size=SIZE,
        views=views,
        mean=MEAN,
        std=STD,
    )
    return build_dataset(cfg, name, train=False)


@dataclass
class Built:
    generator: ReportGenerator
    train: ContextDataset
    val: ReportDataset


def build(root, tmp_path, views: int = 1, lora: bool = False, clues: bool = True, residual: bool = False) -> Built:
    """A tiny generator wired like stages/sft.py: retrieved context with reports, optional clues and LoRA."""
    torch.manual_seed(0)
    train, val = split(root, "train", views), split(root, "val", views)
    words = [train.report(i) for i in range(len(train))] + [
        INSTRUCTION,
        "note with disease normal report",
        "findings suggest no finding",
        *CHEXPERT_14,
    ]
    tokenizer = build_word_tokenizer(words, out_dir=tmp_path / "tokenizer")
    vision = build_vision_model("tiny-vit").eval()
    model_cfg = RRGModelConfig(vision="tiny-vit", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    model = build_rrg_model(model_cfg, tokenizer, vision_model=vision)
    processor = build_processor(model, tokenizer, MEAN, STD)
    if lora:
        model = apply_lora(model, model_cfg)
    context = ContextConfig(mode="retrieved", k_pos=K_POS, k_neg=K_NEG, use_reports=True, max_context_words=5,
                            residual=residual)
    bank = ContextDataset(train)
    batches = (
        {"pixel_values": b["pixel_values"], "id": b["ids"], "report": b["reports"], "labels": b["labels"]}
        for b in DataLoader(bank, batch_size=8, collate_fn=collate_context)
    )
    paths = [[str(p) for p in s.image_paths] for s in train.studies]
    retriever = ContextRetriever.build(context, vision, batches, paths, SIZE, MEAN, STD)
    neighbours = dataset_neighbours(retriever, vision, bank, collate_context, exclude_self=True)
    clue_cfg = DiseaseClueConfig(enabled=clues, dropout=0.0, threshold=0.5)
    clue_head = DiseaseClueHead(vision.config.hidden_size, 0, 0.0) if clues else None
    prompting = PromptingConfig(context=context, clues=clue_cfg, views=views, max_report_tokens=40)
    generator = ReportGenerator(model, processor, prompting, retriever, clue_head)
    return Built(generator, ContextDataset(train, retriever, neighbours), val)


def first_batch(built: Built, n: int = 4) -> dict:
    return collate_context([built.train[i] for i in range(n)])


def image_positions(input_ids: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    return [torch.nonzero(row == image_token_id).flatten() for row in input_ids]


@pytest.mark.parametrize("views", [1, 2])
def test_query_mask_is_the_last_views_images_tokens(data_root, tmp_path, views):
    built = build(data_root, tmp_path, views=views)
    gen, batch = built.generator, first_batch(built)
    processor, n_img = gen.processor, gen.processor.num_image_tokens
    prompts = gen.prompts(batch, gen.clue_presence(gen.clue_logits(batch["pixel_values"])))
    sft = processor.build_sft_batch(prompts, batch["reports"], gen.images(batch), 40)
    generation = processor.build_generation_batch(prompts, gen.images(batch))
    for input_ids in (sft["input_ids"], generation["input_ids"]):  # right- and left-padded
        mask = query_image_mask(gen, input_ids)
        for row, positions in enumerate(image_positions(input_ids, processor.image_token_id)):
            assert len(positions) == (K_POS + K_NEG + views) * n_img
            expected = torch.zeros_like(mask[row])
            expected[positions[-views * n_img :]] = True
            assert torch.equal(mask[row], expected)


@pytest.mark.parametrize("views", [1, 2])
def test_prompts_place_context_before_the_query_images(data_root, tmp_path, views):
    built = build(data_root, tmp_path, views=views)
    gen, batch = built.generator, first_batch(built)
    image = gen.processor.image_token
    for prompt, neg, pos in zip(gen.prompts(batch, None), batch["neg_reports"], batch["pos_reports"], strict=True):
        assert prompt.count(image) == K_NEG + K_POS + views
        assert prompt.endswith(image * views + " " + INSTRUCTION)
        normal, disease = prompt.index(f"Note: {image} normal."), prompt.index(f"Note: {image} with disease.")
        assert normal < disease < prompt.index(image * views + " " + INSTRUCTION)
        assert len(neg) == K_NEG and len(pos) == K_POS
        assert all(" ".join(r.split()[:5]) in prompt for r in neg + pos)
    images = gen.images(batch)
    assert images.shape[1] == K_NEG + K_POS + views
    assert torch.equal(images[:, : K_NEG + K_POS], batch["context_pixels"])
    assert torch.equal(images[:, K_NEG + K_POS :], batch["pixel_values"])


def image_slot_embeddings(gen: ReportGenerator, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM's input embeddings at the query and at the context image placeholders, ``(b, tokens, d)`` each."""
    llava, captured = gen._llava, {}
    hooks = [
        llava.register_forward_pre_hook(lambda m, a, kw: captured.update(input_ids=kw["input_ids"]), with_kwargs=True),
        llava.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: captured.update(embeds=kw["inputs_embeds"]), with_kwargs=True
        ),
    ]
    with torch.no_grad():
        gen(batch)
    for hook in hooks:
        hook.remove()
    b, d = len(batch["ids"]), llava.config.text_config.hidden_size
    query_mask = query_image_mask(gen, captured["input_ids"])
    is_image = captured["input_ids"] == gen.processor.image_token_id
    embeds = captured["embeds"]
    return embeds[query_mask].reshape(b, -1, d), embeds[is_image & ~query_mask].reshape(b, -1, d)


def test_query_placeholders_receive_the_query_features(data_root, tmp_path):
    built = build(data_root, tmp_path, views=2)
    gen, batch = built.generator.eval(), first_batch(built)
    query_slots, context_slots = image_slot_embeddings(gen, batch)
    with torch.no_grad():
        features = gen.model.model.get_image_features
        query = torch.stack(features(pixel_values=batch["pixel_values"].flatten(0, 1)).pooler_output)
        context = torch.stack(features(pixel_values=batch["context_pixels"].flatten(0, 1)).pooler_output)
    torch.testing.assert_close(query_slots, query.reshape(query_slots.shape))
    torch.testing.assert_close(context_slots, context.reshape(context_slots.shape))


@pytest.mark.parametrize("lora", [False, True])
def test_residual_context_slots_carry_query_minus_context(data_root, tmp_path, lora):
    built = build(data_root, tmp_path, views=2, lora=lora, residual=True)
    gen, batch = built.generator.eval(), first_batch(built)
    query_slots, context_slots = image_slot_embeddings(gen, batch)
    llava, b, n = gen._llava, len(batch["ids"]), gen.processor.num_image_tokens
    with torch.no_grad():
        tower = llava.model.vision_tower

        def encoder_features(pixels):  # LLaVA's "default" selection: last hidden state without the cls token
            return tower(pixels.flatten(0, 1), output_hidden_states=True).hidden_states[-1][:, 1:]

        query = encoder_features(batch["pixel_values"]).reshape(b, 2, n, -1)
        context = encoder_features(batch["context_pixels"]).reshape(b, K_NEG + K_POS, n, -1)
        # ``forward`` skips the module's hooks: the plain projector applied to hand-made residuals.
        projector = llava.model.multi_modal_projector
        expected_context = projector.forward((query.mean(1, keepdim=True) - context).flatten(0, 1))
        expected_query = projector.forward(query.flatten(0, 1))
    torch.testing.assert_close(query_slots, expected_query.reshape(query_slots.shape))
    torch.testing.assert_close(context_slots, expected_context.reshape(context_slots.shape))


def test_residual_context_survives_export(data_root, tmp_path):
    built = build(data_root, tmp_path, residual=True)
    gen, batch = built.generator.eval(), first_batch(built)
    with torch.no_grad():
        loss, _ = sft_loss(gen, batch)
    loaded = ReportGenerator.from_export(save_generator(gen, tmp_path / "export")).eval()
    with torch.no_grad():
        reloaded, _ = sft_loss(loaded, batch)
    torch.testing.assert_close(reloaded, loss)
    context = dataclasses.replace(loaded.prompting.context, residual=False)
    plain = ReportGenerator(loaded.model, loaded.processor, dataclasses.replace(loaded.prompting, context=context),
                            loaded.retriever, loaded.clue_head).eval()
    with torch.no_grad():
        without, _ = sft_loss(plain, batch)
    assert not torch.allclose(without, loss)


@pytest.mark.parametrize("lora", [False, True])
def test_residual_context_leaves_the_model_as_it_was_given(data_root, tmp_path, lora):
    built = build(data_root, tmp_path, lora=lora, residual=True)
    gen, batch = built.generator.eval(), first_batch(built)
    projector = gen._llava.model.multi_modal_projector
    # Two images: one whole prompt of the generator's layout (1 query view + 3 context images) would be 4, so a
    # hook left behind would regroup (or reject) a plain call on the study's own images.
    inputs = gen.processor.build_generation_batch(["x", "x"], batch["pixel_values"][:2])
    with torch.no_grad():
        before = gen.model(**inputs).logits
        gen(batch)
        gen.generate_batch(batch, max_new_tokens=3)
        with pytest.raises(RuntimeError, match="boom"), gen.prompt_hooks():
            assert projector._forward_pre_hooks  # active inside the block
            raise RuntimeError("boom")
        assert not projector._forward_pre_hooks
        torch.testing.assert_close(gen.model(**inputs).logits, before, rtol=0, atol=0)


def test_sft_loss_adds_clue_and_self_refine_terms(data_root, tmp_path):
    built = build(data_root, tmp_path)
    gen, batch = built.generator, first_batch(built)
    refine = SelfRefineConfig(weight=0.3)
    loss, metrics = sft_loss(gen, batch, refine)
    assert set(metrics) == {"lm_loss", "clue_bce", "self_refine"}
    expected = (
        metrics["lm_loss"] + gen.prompting.clues.loss_weight * metrics["clue_bce"] + 0.3 * metrics["self_refine"]
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert gen.clue_head.net[-1].weight.grad.abs().sum() > 0
    assert gen.model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    _, plain = sft_loss(gen, batch)
    assert set(plain) == {"lm_loss", "clue_bce"}


def test_self_refine_pairs_the_llm_input_image_embeddings_with_the_last_layer_report_states(data_root, tmp_path):
    built = build(data_root, tmp_path, views=2)
    gen, batch = built.generator.eval(), first_batch(built)
    llava, captured = gen._llava, {}
    hooks = [
        llava.register_forward_pre_hook(lambda m, a, kw: captured.update(ids=kw["input_ids"], labels=kw["labels"]),
                                        with_kwargs=True),
        llava.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: captured.update(embeds=kw["inputs_embeds"]), with_kwargs=True),
        llava.model.language_model.register_forward_hook(
            lambda m, a, out: captured.update(last=out.last_hidden_state)),
    ]
    with torch.no_grad():
        _, metrics = sft_loss(gen, batch, SelfRefineConfig(weight=0.5))
    for hook in hooks:
        hook.remove()
    query, report = query_image_mask(gen, captured["ids"]), captured["labels"] != -100
    # The image side is the projector output scattered into the LLM input, not a hidden state of the LLM.
    expected = self_refining_loss(captured["embeds"], query, captured["last"], report)
    assert metrics["self_refine"] == pytest.approx(expected.item(), rel=1e-5)


def test_serpent_formulation_scales_the_lm_loss_and_adds_exp_of_summed_cosines(data_root, tmp_path):
    built = build(data_root, tmp_path)
    gen, batch = built.generator.eval(), first_batch(built)
    refine = SelfRefineConfig(weight=0.1, report_weight=0.05, formulation="serpent")
    with pytest.raises(ValueError, match="set its attention to eager"):
        sft_loss(gen, batch, refine)
    gen.model.set_attn_implementation("eager")
    loss, metrics = sft_loss(gen, batch, refine)
    clue_weight = gen.prompting.clues.loss_weight
    expected = 0.05 * metrics["lm_loss"] + clue_weight * metrics["clue_bce"] + 0.1 * metrics["self_refine"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    studies = len(batch["reports"])
    assert math.exp(-studies) <= metrics["self_refine"] <= math.exp(studies)
    loss.backward()
    assert gen.model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_clues_without_labels_raise(data_root, tmp_path):
    built = build(data_root, tmp_path)
    batch = {**first_batch(built), "labels": None}
    with pytest.raises(ValueError, match="clues.enabled needs CheXpert labels"):
        sft_loss(built.generator, batch)


def test_attach_context_matches_the_dataset_context(data_root, tmp_path):
    built = build(data_root, tmp_path)
    gen = built.generator
    val = ContextDataset(
        built.val,
        gen.retriever,
        dataset_neighbours(
            gen.retriever, gen.vision_tower, ContextDataset(built.val), collate_context, exclude_self=False
        ),
    )
    batch = collate_context([val[i] for i in range(len(val))])
    attached = gen.attach_context({"ids": batch["ids"], "pixel_values": batch["pixel_values"]})
    torch.testing.assert_close(attached["context_pixels"], batch["context_pixels"])
    assert attached["neg_reports"] == batch["neg_reports"] and attached["pos_reports"] == batch["pos_reports"]


@pytest.mark.parametrize("lora", [False, True])
def test_export_round_trip_generates_the_same_reports(data_root, tmp_path, lora):
    built = build(data_root, tmp_path, lora=lora)
    gen = built.generator
    with torch.no_grad():
        for name, param in gen.named_parameters():
            if "lora_B" in name or "clue_head" in name:
                param.normal_(0.0, 0.5)  # non-trivial adapters (merged at export) and clue sentences
    gen.eval()
    batch = first_batch(built)
    pixels = torch.stack([built.val[i]["pixel_values"] for i in range(len(built.val))])
    ids = [s.id for s in built.val.studies]
    with torch.no_grad():
        expected_loss, _ = sft_loss(gen, batch)
    expected = gen.generate(pixels, ids, max_new_tokens=12)
    assert all(expected)
    loaded = ReportGenerator.from_export(save_generator(gen, tmp_path / "export"))
    assert loaded.prompting == gen.prompting and not loaded.training
    assert loaded.retriever.bank.ids == gen.retriever.bank.ids
    assert (loaded.image_size, loaded.views, loaded.mean, loaded.std) == (SIZE, 1, MEAN, STD)
    assert loaded.generate(pixels, ids, max_new_tokens=12) == expected
    with torch.no_grad():
        loaded_loss, _ = sft_loss(loaded, batch)
    torch.testing.assert_close(loaded_loss, expected_loss, rtol=1e-4, atol=1e-5)


def test_copied_export_generates_with_the_training_data_gone(tmp_path):
    root = tmp_path / "data"
    write_synthetic_dataset(root, SyntheticConfig(n_train=12, n_val=2, n_test=0, image_size=SIZE, seed=5))
    built = build(root, tmp_path, residual=True)
    gen = built.generator.eval()
    pixels = torch.stack([built.val[i]["pixel_values"] for i in range(len(built.val))])
    expected = gen.generate(pixels, max_new_tokens=12)
    save_generator(gen, tmp_path / "export")
    shutil.copytree(tmp_path / "export", tmp_path / "copied")
    shutil.rmtree(root)
    shutil.rmtree(tmp_path / "export")
    assert not any(str(root) in f.read_text() for f in (tmp_path / "copied").rglob("*.json"))
    assert ReportGenerator.from_export(tmp_path / "copied").generate(pixels, max_new_tokens=12) == expected


def test_from_export_names_the_missing_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"prompting\.yaml is missing"):
        ReportGenerator.from_export(tmp_path)


def test_constructor_checks_retriever_and_clue_head(data_root, tmp_path):
    gen = build(data_root, tmp_path).generator
    with pytest.raises(ValueError, match="needs a retriever"):
        ReportGenerator(gen.model, gen.processor, gen.prompting, None, gen.clue_head)
    with pytest.raises(ValueError, match="clue head"):
        ReportGenerator(gen.model, gen.processor, gen.prompting, gen.retriever, None)


def test_gold_clue_prompts_in_sft_training_only(data_root, tmp_path):
    built = build(data_root, tmp_path)
    gen, batch = built.generator, first_batch(built)
    head = gen.clue_presence(gen.clue_logits(batch["pixel_values"]))
    gold = batch["labels"] == 1
    gen.prompting.clues.gold_prompt_prob = 1.0
    gen.train()
    assert torch.equal(gen._training_clues(batch, gen.clue_logits(batch["pixel_values"])), gold)
    gen.eval()  # evaluation and inference always prompt with the head's own clues
    assert torch.equal(gen._training_clues(batch, gen.clue_logits(batch["pixel_values"])), head)
    gen.train()
    with pytest.raises(ValueError, match="labels"):
        gen._training_clues({**batch, "labels": None}, gen.clue_logits(batch["pixel_values"]))


def clue_head_in_eval(data_root, tmp_path):
    """A built generator in eval mode, its first batch and the clue head's logits on it."""
    built = build(data_root, tmp_path)
    gen, batch = built.generator, first_batch(built)
    gen.eval()
    with torch.no_grad():
        return gen, batch, gen.clue_logits(batch["pixel_values"])


def test_per_observation_thresholds_decide_the_clues_and_survive_export(data_root, tmp_path):
    gen, batch, logits = clue_head_in_eval(data_root, tmp_path)
    probs = torch.sigmoid(logits)
    # A threshold just below one study's probability states that observation for it and for no study above it.
    thresholds = [1.01] * len(CHEXPERT_14)
    thresholds[1] = float(probs[:, 1].max()) - 1e-6
    gen.prompting.clues.thresholds = thresholds
    presence = gen.clue_presence(logits)
    assert presence[:, [0, *range(2, 14)]].sum() == 0 and presence[:, 1].sum() == 1
    assert CHEXPERT_14[1].lower() in gen.prompts(batch, presence)[int(probs[:, 1].argmax())]
    loaded = ReportGenerator.from_export(save_generator(gen, tmp_path / "export"))
    assert loaded.prompting.clues.thresholds == thresholds
    assert torch.equal(loaded.clue_presence(loaded.clue_logits(batch["pixel_values"])), presence)
    with pytest.raises(ValueError, match="thresholds must be 14 values"):
        DiseaseClueConfig(thresholds=[0.5] * 13)


def test_rl_samples_each_clue_statement_as_a_coin_flip_where_the_heads_decision_flips(data_root, tmp_path):
    gen, batch, logits = clue_head_in_eval(data_root, tmp_path)
    probs = torch.sigmoid(logits)
    thresholds = probs[0].tolist()  # study 0 sits exactly on every threshold
    thresholds[3] = 1.01  # never stated: never sampled either, and still finite
    gen.prompting.clues.thresholds = thresholds
    action = gen.clue_action_logits(logits, temperature=0.5)
    assert torch.isfinite(action).all()
    torch.testing.assert_close(torch.sigmoid(action[0, [0, 1, 2, *range(4, 14)]]), torch.full((13,), 0.5))
    assert (torch.sigmoid(action[:, 3]) < 1e-4).all()
    # The mode of the sampled statements is what the head states at evaluation.
    assert torch.equal(action[1:] > 0, gen.clue_presence(logits)[1:])


def test_tuned_clue_thresholds_maximise_the_heads_micro_f1(data_root, tmp_path):
    built = build(data_root, tmp_path)
    gen = built.generator
    with torch.no_grad():
        gen.clue_head.net[-1].weight.normal_(0.0, 0.5)  # an informative-looking, untrained head
    thresholds = tune_clue_thresholds(gen, built.val)
    assert gen.prompting.clues.thresholds == thresholds and len(thresholds) == len(CHEXPERT_14)
    features, targets = study_features(gen, built.val)
    probs = clue_probabilities(gen, features)
    tuned = ce_metrics(torch.where(probs >= torch.tensor(thresholds), 1, 0), targets.long()).scores["micro_f1_14"]
    fixed = ce_metrics(torch.where(probs >= 0.5, 1, 0), targets.long()).scores["micro_f1_14"]
    assert tuned >= fixed and torch.equal(clue_predictions(gen, features), probs >= torch.tensor(thresholds))
    # The probe's rule on the head's own probabilities and the split's gold positives.
    assert thresholds == best_thresholds(probs.double(), targets).tolist()


def test_a_refit_clue_head_reads_what_a_probe_on_its_readout_inputs_reads(data_root, tmp_path):
    built = build(data_root, tmp_path)
    gen = built.generator.eval()
    train = built.train.base
    features, targets = study_features(gen, train)
    before = clue_probabilities(gen, features)
    refit_clue_head(gen, train, l2=1e-2)
    with torch.no_grad():
        inputs = gen.clue_head.readout_inputs(features).double()
    expected = probe_probabilities(inputs, fit_logistic_probe(inputs, targets, l2=1e-2))
    after = clue_probabilities(gen, features)
    torch.testing.assert_close(after.double(), expected, atol=1e-5, rtol=0)  # the standardisation folds in exactly
    assert not torch.allclose(after, before, atol=1e-3)

    def log_loss(probs: torch.Tensor) -> float:
        return float(torch.nn.functional.binary_cross_entropy(probs.double().clamp(1e-6, 1 - 1e-6), targets.double()))

    assert log_loss(after) < log_loss(before)


def test_finding_weight_reaches_the_lm_loss(data_root, tmp_path):
    built = build(data_root, tmp_path, clues=False)
    gen, batch = built.generator, first_batch(built)
    gen.eval()  # no dropout: the same forward three times
    assert any(finding_spans(r) for r in batch["reports"])  # the batch has finding sentences to weight
    with torch.no_grad():
        plain, _ = sft_loss(gen, batch)
        same, _ = sft_loss(gen, batch, lm=LMLossConfig(finding_weight=1.0))
        weighted, metrics = sft_loss(gen, batch, lm=LMLossConfig(finding_weight=4.0))
        inputs = gen.processor.build_sft_batch(gen.prompts(batch, None), batch["reports"], gen.images(batch),
                                               gen.prompting.max_report_tokens, return_offsets=True)
        offsets = inputs.pop("report_offsets")
        logits = gen.model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    # Independent weights: 4 on the tokens of each report's finding sentences, 1 elsewhere.
    weights = torch.ones(inputs["labels"].shape)
    for i, (row, report) in enumerate(zip(offsets, batch["reports"], strict=True)):
        start = int(torch.nonzero(inputs["labels"][i] != -100)[0])
        for j, (s, e) in enumerate(row):
            if any(a < e and s < b for a, b in finding_spans(report)):
                weights[i, start + j] = 4.0
    torch.testing.assert_close(same, plain)
    torch.testing.assert_close(weighted, weighted_lm_loss(logits, inputs["labels"], weights))
    assert not torch.isclose(weighted, plain) and metrics["lm_loss"] == pytest.approx(weighted.item())



def test_unlikelihood_reaches_the_sft_loss(data_root, tmp_path):
    built = build(data_root, tmp_path, clues=False)
    gen, batch = built.generator, first_batch(built)
    gen.eval()
    with torch.no_grad():
        plain, _ = sft_loss(gen, batch)
        with_ul, metrics = sft_loss(gen, batch, lm=LMLossConfig(unlikelihood_weight=0.5))
        inputs = gen.processor.build_sft_batch(gen.prompts(batch, None), batch["reports"], gen.images(batch),
                                               gen.prompting.max_report_tokens)
        logits = gen.model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    expected = unlikelihood_loss(logits, inputs["labels"])
    assert expected > 0 and metrics["unlikelihood"] == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(with_ul, plain + 0.5 * expected)
    with pytest.raises(ValueError, match="lm.unlikelihood_weight must be >= 0"):
        LMLossConfig(unlikelihood_weight=-1.0)
    with pytest.raises(ValueError, match="lm.finding_weight must be >= 1"):
        LMLossConfig(finding_weight=0.5)

# An instruct LLM's kind of chat template, in the tiny vocabulary: BOS, the user turn closed by eos, then the
# generation prompt (the assistant turn's start) after which SFT targets and generated reports come.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['content'] }} {{ eos_token }} {% endfor %}"
                 "{% if add_generation_prompt %}findings {% endif %}")


@pytest.mark.parametrize("setting", ["auto", True, False])
def test_chat_template_setting_formats_training_and_generation_and_survives_export(tmp_path, setting):
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path)
    tiny.tokenizer.chat_template = CHAT_TEMPLATE
    gen = ReportGenerator(tiny.model, tiny.processor, PromptingConfig(chat_template=setting)).eval()
    chat = setting is not False
    assert gen.processor.chat_prompts is chat
    pixels = torch.randn(2, 1, 3, SIZE, SIZE)
    batch = {**gen.attach_context({"ids": ["a", "b"], "pixel_values": pixels}), "reports": list(TINY_REPORTS[:2]),
             "labels": None}
    prompts = gen.prompts(batch, None)
    sft = gen.processor.build_sft_batch(prompts, batch["reports"], gen.images(batch))
    start = gen.processor.tokenizer("findings", add_special_tokens=False)["input_ids"][0]
    first_label = int((sft["labels"][0] != -100).nonzero()[0])
    # Chat: the report is supervised right after the generation prompt, and generation starts from it too.
    assert bool(sft["input_ids"][0, first_label - 1] == start) is chat
    assert bool((gen.generation_inputs(batch)["input_ids"][:, -1] == start).all()) is chat
    expected = gen.generate(pixels, max_new_tokens=6)
    loaded = ReportGenerator.from_export(save_generator(gen, tmp_path / "export"))
    assert loaded.processor.chat_prompts is chat and loaded.prompting.chat_template == setting
    assert loaded.generate(pixels, max_new_tokens=6) == expected
    with pytest.raises(ValueError, match="chat_template must be auto, true or false"):
        PromptingConfig(chat_template="yes")


def clue_misses(labeler: RuleLabeler, candidates: list[str], clues: torch.Tensor) -> list[int]:
    """Per candidate, the observations (not No Finding) where its positive mentions differ from the clues."""
    stated = labeler.label(candidates) == POSITIVE
    observations = [o for o, name in enumerate(CHEXPERT_14) if name != "No Finding"]
    return [sum(bool(stated[c, o]) != bool(clues[o]) for o in observations) for c in range(len(candidates))]


def assert_most_consistent(chosen: list[str], greedy: list[str], sampled: list[list[str]],
                           clues: torch.Tensor) -> list[int]:
    """Asserts each chosen report is the first of its candidates (greedy, then sampled) with the fewest clue misses;
    returns the chosen candidates' indices."""
    labeler, picked = RuleLabeler(), []
    for i, report in enumerate(chosen):
        candidates = [greedy[i], *sampled[i]]
        misses = clue_misses(labeler, candidates, clues[i])
        picked.append(misses.index(min(misses)))
        assert report == candidates[picked[-1]]
    return picked


def test_clue_consistent_decoding_returns_the_candidate_that_states_the_clues(data_root, tmp_path):
    built = build(data_root, tmp_path)
    gen, batch = built.generator, first_batch(built)
    greedy = gen.generate_batch(batch, max_new_tokens=12)
    gen.prompting.rerank = ClueRerankConfig(candidates=6, temperature=1.5, seed=5)
    state = torch.get_rng_state()
    chosen = gen.generate_batch(batch, max_new_tokens=12)
    assert torch.equal(torch.get_rng_state(), state)  # training's random stream is untouched
    assert gen.generate_batch(batch, max_new_tokens=12) == chosen
    # The choice, made by a direct count over the 13 observations of the candidates.
    clues = gen.clue_presence(gen.clue_logits(batch["pixel_values"]))
    sampled = gen.rerank_candidates(batch, max_new_tokens=12)
    assert [len(row) for row in sampled] == [6] * len(chosen)
    # Some study's greedy report was not the most consistent: the test saw a choice made.
    assert any(assert_most_consistent(chosen, greedy, sampled, clues))
    # Consensus tie-breaking: of the fewest misses, the candidate with the highest mean ROUGE-L to the others.
    gen.prompting.rerank = ClueRerankConfig(candidates=6, temperature=1.5, seed=5, tie_break="consensus")
    labeler = RuleLabeler()
    for i, report in enumerate(gen.generate_batch(batch, max_new_tokens=12)):
        candidates = [greedy[i], *sampled[i]]
        misses = clue_misses(labeler, candidates, clues[i])
        words = [c.lower().split() for c in candidates]
        mean_rouge = [sum(rouge_l(words[a], words[b]) for b in range(7) if b != a) / 6 for a in range(7)]
        fewest = [c for c in range(7) if misses[c] == min(misses)]
        assert report == candidates[max(fewest, key=lambda c: (mean_rouge[c], -c))]
    gen.prompting.rerank = ClueRerankConfig(candidates=6, temperature=1.5, seed=5)
    # The setting travels with the export (whose remote code must stay free of machine paths), and decodes alike.
    save_generator(gen, tmp_path / "export")
    loaded = ReportGenerator.from_export(tmp_path / "export")
    assert loaded.prompting.rerank == gen.prompting.rerank
    assert loaded.generate_batch(batch, max_new_tokens=12) == chosen


def test_a_study_draws_the_same_rerank_candidates_alone_and_in_any_batch(data_root, tmp_path):
    built = build(data_root, tmp_path)
    gen = built.generator
    gen.prompting.rerank = ClueRerankConfig(candidates=4, temperature=1.5)
    studies = [built.train[i] for i in range(4)]
    together = gen.rerank_candidates(collate_context(studies), max_new_tokens=12)
    assert len({tuple(row) for row in together}) == 4 and all(len(set(row)) > 1 for row in together)  # they vary
    reordered = gen.rerank_candidates(collate_context(studies[::-1][:3]), max_new_tokens=12)
    alone = [gen.rerank_candidates(collate_context([study]), max_new_tokens=12)[0] for study in studies]
    assert reordered == together[1:][::-1] and alone == together
    chosen = gen.generate_batch(collate_context(studies), max_new_tokens=12)
    assert [gen.generate_batch(collate_context([study]), max_new_tokens=12)[0] for study in studies] == chosen
    gen.prompting.rerank = ClueRerankConfig(candidates=4, temperature=1.5, seed=1)
    assert gen.rerank_candidates(collate_context(studies), max_new_tokens=12) != together


def test_told_clues_replace_the_heads_in_the_prompt_and_in_the_rerank(data_root, tmp_path):
    built = build(data_root, tmp_path)
    gen, batch = built.generator, first_batch(built)
    head = gen.clue_presence(gen.clue_logits(batch["pixel_values"]))
    told = torch.zeros_like(head)
    told[:, CHEXPERT_14.index("Cardiomegaly")] = True
    told[1:, CHEXPERT_14.index("Pleural Effusion")] = True
    assert not torch.equal(told, head)
    stated, prompts = [], gen.prompts
    gen.prompts = lambda b, clues: stated.append(clues) or prompts(b, clues)
    try:
        reports = gen.generate_batch(batch, max_new_tokens=12, clues=told)
        assert len(stated) == 1 and torch.equal(stated[0], told)
        assert gen.generate_batch(batch, max_new_tokens=12) != reports  # the prompt, hence the report, changed
        assert torch.equal(stated[1], head)
        # Reranking agrees with the told findings, not with the head's.
        gen.prompting.rerank = ClueRerankConfig(candidates=6, temperature=1.5, seed=5)
        greedy = reports
        chosen = gen.generate_batch(batch, max_new_tokens=12, clues=told)
        inputs = gen.generation_inputs(batch, told)
        with gen.prompt_hooks():
            sampled = gen._sampled_candidates(batch, inputs, 12)
    finally:
        del gen.prompts
        gen.prompting.rerank = ClueRerankConfig()
    assert_most_consistent(chosen, greedy, sampled, told)
