"""Encode once: a frozen tower's features computed one time per RL step give the same log-probs, values,
gradients and generations as re-encoding, while the tower sees each distinct image once."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlhf_rrg.losses.sft import sft_loss
from rlhf_rrg.models.disease_clues import DiseaseClueConfig, DiseaseClueHead
from rlhf_rrg.models.vision_features import encode_frozen, freeze_unread_vision, replay_features
from rlhf_rrg.prompting.generator import PromptingConfig, ReportGenerator
from rlhf_rrg.retrieval.context import ContextConfig
from rlhf_rrg.rl.policy import PolicyWithValue, ReferencePolicy
from rlhf_rrg.rl.rollout import encode_batch_images, generate_rollout
from rlhf_rrg.rl.value_head import ValueHead
from rlhf_rrg.testing.tiny_models import tiny_rrg

VIEWS = 2


def make_generator(tmp_path, encoder_type: str) -> ReportGenerator:
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path, encoder_type=encoder_type)
    width = tiny.model.config.vision_config.hidden_size
    clues = DiseaseClueConfig(enabled=True, threshold=0.3)
    prompting = PromptingConfig(context=ContextConfig(mode="none"), clues=clues, views=VIEWS)
    return ReportGenerator(tiny.model, tiny.processor, prompting, clue_head=DiseaseClueHead(width, dropout=0.0)).eval()


def make_batch(b: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"ids": [f"s{i}" for i in range(b)], "pixel_values": torch.randn(b, VIEWS, 3, 64, 64, generator=g),
            "context_pixels": torch.empty(b, 0, 3, 64, 64), "reports": ["lungs are clear ."] * b,
            "neg_reports": [[]] * b, "pos_reports": [[]] * b, "labels": None}


def count_encoded(generator: ReportGenerator) -> list[int]:
    """Images that reach the tower's encoder (a replayed call never does), one entry per call."""
    seen: list[int] = []
    generator.vision_tower.encoder.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    return seen


def test_a_ppo_and_scst_step_encode_each_distinct_image_once(tmp_path):
    generator = make_generator(tmp_path, "vit")
    policy = PolicyWithValue(generator, ValueHead(generator.model.config.text_config.hidden_size))
    reference = ReferencePolicy(generator.model)
    seen = count_encoded(generator)
    ref_seen = []
    reference._copy.model.vision_tower.encoder.register_forward_hook(lambda _m, a, _o: ref_seen.append(a[0].shape[0]))
    batch = make_batch(3)
    distinct = 3 * VIEWS

    features = encode_batch_images(generator, batch)
    rollout = generate_rollout(generator, batch, max_new_tokens=4, do_sample=True, repeats=2, features=features)
    greedy = generate_rollout(generator, batch, max_new_tokens=4, do_sample=False, features=features)
    assert rollout.pixel_values.shape[0] == 2 * distinct and greedy.response_ids.shape[0] == 3
    with torch.no_grad():
        policy(rollout)
    reference.logprobs(rollout)
    for _epoch in range(2):
        for rows in (torch.tensor([0, 3]), torch.tensor([5, 1, 2, 4])):
            out = policy(rollout.select(rows), nll_batch={**batch, "vision_features": features})
            (out["logprobs"].sum() + out["values"].sum() + out["nll"]).backward()
    assert sum(seen) + sum(ref_seen) == distinct
    assert seen == [distinct] and ref_seen == []


@pytest.mark.parametrize("encoder_type", ["vit", "vim"])
def test_replayed_features_give_identical_logprobs_values_and_gradients(tmp_path, encoder_type):
    generator = make_generator(tmp_path, encoder_type)
    policy = PolicyWithValue(generator, ValueHead(generator.model.config.text_config.hidden_size))
    batch = make_batch(2)
    rollout = generate_rollout(generator, batch, max_new_tokens=5, do_sample=True, repeats=2)
    assert rollout.vision_features is not None
    uncached = dataclasses.replace(rollout, vision_features=None)

    def run(r, nll_batch):
        policy.zero_grad()
        out = policy(r, nll_batch=nll_batch)
        (out["logprobs"].sum() + out["values"].square().sum() + out["nll"]).backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in out.items()}, grads

    cached_out, cached_grads = run(rollout, {**batch, "vision_features": encode_batch_images(generator, batch)})
    plain_out, plain_grads = run(uncached, batch)
    for key in plain_out:
        torch.testing.assert_close(cached_out[key], plain_out[key], rtol=0, atol=0, msg=key)
    assert cached_grads.keys() == plain_grads.keys() and any("multi_modal_projector" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=0, atol=0, msg=name)


def test_generation_with_features_matches_re_encoding(tmp_path):
    generator = make_generator(tmp_path, "vit")
    batch = make_batch(2)
    rollout = generate_rollout(generator, batch, max_new_tokens=6, do_sample=False)
    assert rollout.texts == generator.generate_batch(batch, max_new_tokens=6)  # re-encodes through the tower


def test_trainable_tower_is_never_cached(tmp_path):
    generator = make_generator(tmp_path, "vit")
    generator.vision_tower.requires_grad_(True)
    assert encode_frozen(generator.model, torch.randn(1, 3, 64, 64)) is None
    assert generate_rollout(generator, make_batch(1), max_new_tokens=2, do_sample=False).vision_features is None


def test_replay_with_the_wrong_number_of_images_is_named(tmp_path):
    generator = make_generator(tmp_path, "vit")
    features = encode_frozen(generator.model, torch.randn(2, 3, 64, 64))
    with replay_features(generator.model, features), pytest.raises(ValueError, match="3 images passed"):
        generator.vision_tower(torch.randn(3, 3, 64, 64))
    assert "forward" not in generator.vision_tower.__dict__  # the tower is restored


@pytest.mark.parametrize(("encoder_type", "feature_layer", "frozen"), [
    ("vit", -1, ["encoder.norm.weight", "encoder.norm.bias"]),
    ("vim", -1, ["encoder.norm_f.weight"]),
    ("arm", -1, ["encoder.norm_f.weight"]),
    ("vit", -2, ["encoder.blocks.1.", "encoder.norm.weight", "encoder.norm.bias"]),
])
def test_unread_tower_weights_are_frozen_and_every_trainable_one_gets_a_gradient(tmp_path, encoder_type,
                                                                                 feature_layer, frozen):
    # What DDP needs: no trainable parameter without a gradient (it aborts at the next step otherwise).
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path, encoder_type=encoder_type)
    tiny.model.config.vision_feature_layer = feature_layer
    prompting = PromptingConfig(context=ContextConfig(mode="none"), views=VIEWS)
    generator = ReportGenerator(tiny.model, tiny.processor, prompting)
    generator.vision_tower.requires_grad_(True)
    names = freeze_unread_vision(generator.model, output_read=False)
    assert [n for n in names if not any(n.startswith(f) for f in frozen)] == []
    assert all(any(n.startswith(f) for n in names) for f in frozen)
    loss, _ = sft_loss(generator, make_batch(2))
    loss.backward()
    missing = [n for n, p in generator.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_a_read_output_keeps_the_whole_tower_trainable(tmp_path):
    generator = make_generator(tmp_path, "vit")  # with a clue head, which reads pooler_output
    generator.vision_tower.requires_grad_(True)
    assert freeze_unread_vision(generator.model, output_read=True) == []
    assert all(p.requires_grad for p in generator.vision_tower.parameters())
