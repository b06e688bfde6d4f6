import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

from rlhf_rrg.export.save import save_rrg
from rlhf_rrg.models.llm_configs import check_llm_path
from rlhf_rrg.models.rrg import (
    LoraSettings,
    RRGModelConfig,
    apply_lora,
    build_processor,
    build_rrg_model,
    generate_reports,
    load_rrg,
)
from rlhf_rrg.optim import OptimConfig, build_optimizer, module_prefix
from rlhf_rrg.runroot import DamagedExportError, writing_export
from rlhf_rrg.testing.tiny_models import TINY_PROMPT, TINY_REPORTS, tiny_rrg


def _batch(tiny, n=2, seed=0):
    pixels = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return tiny.processor.build_sft_batch([TINY_PROMPT] * n, list(TINY_REPORTS[:n]), pixels)


@pytest.mark.parametrize("encoder_type", ["vit", "vim"])
def test_forward_backward_loss_is_masked_token_ce(tmp_path, encoder_type):
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path, encoder_type=encoder_type)
    assert isinstance(tiny.model, LlavaForConditionalGeneration)
    batch = _batch(tiny)
    out = tiny.model(**batch)
    # Independent reference: next-token CE over report+eos positions only.
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(logits[keep], labels[keep]))
    out.loss.backward()
    projector_grad = tiny.model.model.multi_modal_projector.linear_1.weight.grad
    assert projector_grad is not None and projector_grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.model.model.vision_tower.parameters())  # frozen by default


def test_generation_suppresses_the_image_token(tmp_path):
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path)
    image_id = tiny.processor.image_token_id

    # Make <image> the most likely next token everywhere: only suppression can keep it out.
    def boost_image_token(module, inputs, logits):
        return logits.index_add(-1, torch.tensor([image_id]), torch.full_like(logits[..., :1], 1e4))

    hook = tiny.model.lm_head.register_forward_hook(boost_image_token)
    batch = _batch(tiny)
    assert (tiny.model(**batch).logits.argmax(-1) == image_id).all()
    pixels = torch.randn(2, 3, 64, 64)
    for kwargs in ({}, {"do_sample": True}, {"num_beams": 2}):
        reports = generate_reports(tiny.model, tiny.processor, pixels, [TINY_PROMPT] * 2, max_new_tokens=5, **kwargs)
        assert len(reports) == 2 and all(isinstance(r, str) and r for r in reports)
        assert all("<image>" not in r for r in reports)
    hook.remove()


def test_lora_freezes_base_and_trains_adapter_and_projector(tmp_path):
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path)
    model = apply_lora(tiny.model, tiny.config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "multi_modal_projector.modules_to_save" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # step 1 moves lora_B (it starts at 0), step 2 then also moves lora_A
        optim.zero_grad()
        model(**_batch(tiny)).loss.backward()
        optim.step()
    for name, param in model.named_parameters():
        assert torch.equal(before[name], param) != (name in trainable), name


def test_unfrozen_vision_is_trained_through_modules_to_save(tmp_path):
    tiny = tiny_rrg(tmp_path)
    tiny.config.freeze_vision = False
    model = apply_lora(build_rrg_model(tiny.config, tiny.tokenizer), tiny.config)
    assert any("vision_tower.modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)


def test_vision_lr_scale_reaches_the_trained_modules_to_save_copy(tmp_path):
    tiny = tiny_rrg(tmp_path)
    tiny.config.freeze_vision = False
    model = apply_lora(build_rrg_model(tiny.config, tiny.tokenizer), tiny.config)
    vision = model.get_base_model().model.vision_tower
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3), {module_prefix(model, vision): 0.1})
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    trained = [p for p in vision.parameters() if p.requires_grad]
    assert trained and all(lrs[id(p)] == pytest.approx(1e-4) for p in trained)
    others = [p for n, p in model.named_parameters() if p.requires_grad and "vision_tower" not in n]
    assert others and all(lrs[id(p)] == 1e-3 for p in others)


def test_tiny_llm_width_and_depth_come_from_the_config(tmp_path):
    tiny = tiny_rrg(tmp_path)
    wide = build_rrg_model(RRGModelConfig(vision="tiny-vit", tiny_hidden_size=96, tiny_layers=3), tiny.tokenizer)
    text = wide.config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (96, 192, 3)
    assert len(wide.model.language_model.layers) == 3
    assert tiny.model.config.text_config.hidden_size == 64  # the default stays the demo's
    with pytest.raises(ValueError, match="divisible by its 4 heads"):
        build_rrg_model(RRGModelConfig(vision="tiny-vit", tiny_hidden_size=30), tiny.tokenizer)
    with pytest.raises(ValueError, match="vocab_min_freq must be >= 1"):
        RRGModelConfig(vocab_min_freq=0)


def test_vision_lr_scale_must_be_positive():
    with pytest.raises(ValueError, match="model.vision_lr_scale must be > 0"):
        RRGModelConfig(vision_lr_scale=0.0)


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path, encoder_type="vim")
    model = apply_lora(tiny.model, tiny.config)
    with torch.no_grad():  # non-trivial adapter and projector, so merging actually changes weights
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    model.eval()
    batch = _batch(tiny)
    with torch.no_grad():
        expected = model(**batch).logits
    base_before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    out = save_rrg(model, tiny.processor, tmp_path / "export")
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in base_before.items())  # live model intact
    loaded, processor = load_rrg(out)
    assert isinstance(loaded, LlavaForConditionalGeneration)
    assert type(AutoModelForImageTextToText.from_pretrained(out)) is LlavaForConditionalGeneration
    reloaded_batch = processor.build_sft_batch([TINY_PROMPT] * 2, list(TINY_REPORTS[:2]), batch["pixel_values"])
    assert all(torch.equal(reloaded_batch[k], batch[k]) for k in batch)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    assert loaded.generation_config.suppress_tokens == [processor.image_token_id]

    # The adapter names, relative to itself, a base that exists (saved beside it: no folder held this in-memory
    # assembly) and rebuilds the merged model on it.
    base = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "base"
    rebuilt = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(out / "adapter" / base),
                                        out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch).logits, expected, rtol=1e-5, atol=1e-5)

    # A LoRA on weights loaded from a folder (RL on an SFT export) names that folder and saves no copy.
    again = save_rrg(apply_lora(load_rrg(out)[0], tiny.config), processor, tmp_path / "rl_export")
    base = json.loads((again / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "../../export" and (again / "adapter" / base).resolve() == out.resolve()
    assert not (again / "adapter" / "base").exists()


def test_load_is_strict(tmp_path):
    tiny = tiny_rrg(tmp_path)
    out = save_rrg(tiny.model, tiny.processor, tmp_path / "export")
    weights = load_file(out / "model.safetensors")
    dropped = next(k for k in weights if "multi_modal_projector" in k)
    del weights[dropped]
    weights["model.extra.weight"] = torch.zeros(1)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="does not match"):
        load_rrg(out)


def test_a_damaged_export_is_named_before_loading(tmp_path):
    tiny = tiny_rrg(tmp_path)
    export = tmp_path / "sft" / "export"
    with writing_export(export, {"stage": "sft"}) as out:
        save_rrg(tiny.model, tiny.processor, out)
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # damaged after it was marked complete
    with pytest.raises(DamagedExportError, match=rf"export {export} is damaged: {weights} has 100 bytes"):
        load_rrg(export)


def test_pretrained_llm_is_grafted_and_embeddings_resized(tmp_path):
    # A 1-layer model with Qwen2.5-0.5B's width and tied embeddings, saved in the on-disk layout of the real one.
    tiny = tiny_rrg(tmp_path)
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tiny.tokenizer) - 1,
            hidden_size=896,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    llm.save_pretrained(tmp_path / "qwen")
    cfg = RRGModelConfig(vision="tiny-vit", llm="qwen2.5-0.5b", llm_path=str(tmp_path / "qwen"))
    model = build_rrg_model(cfg, tiny.tokenizer)
    embed = model.get_input_embeddings().weight
    assert embed.shape == (len(tiny.tokenizer), 896)
    torch.testing.assert_close(embed[: len(tiny.tokenizer) - 1], llm.get_input_embeddings().weight)
    assert model.lm_head.weight.data_ptr() == embed.data_ptr()
    q = model.model.language_model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(q, llm.model.layers[0].self_attn.q_proj.weight)
    batch = build_processor(model, tiny.tokenizer).build_sft_batch(
        [TINY_PROMPT], [TINY_REPORTS[0]], torch.randn(1, 3, 64, 64)
    )
    assert torch.isfinite(model(**batch).loss)


def test_config_errors_name_the_field_and_path(tmp_path):
    with pytest.raises(ValueError, match="llm_path"):
        RRGModelConfig(llm="qwen2.5-0.5b")
    with pytest.raises(ValueError, match="llm_path is required for the pretrained LLM 'gpt-5'"):
        RRGModelConfig(llm="gpt-5")
    with pytest.raises(ValueError, match="tiny-vit"):
        RRGModelConfig(vision=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="lora.r"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match=str(tmp_path / "missing" / "config.json")):
        check_llm_path("llama-3.2-1b", tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 896}')
    with pytest.raises(ValueError, match="llama-3.2-1b"):
        check_llm_path("llama-3.2-1b", tmp_path)
