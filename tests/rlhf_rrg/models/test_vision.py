import pytest
import torch
from transformers import AutoConfig, AutoModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from rlhf_rrg.models.vision import RRGVisionConfig, RRGVisionModel, tiny_vision_config, vim_base, vim_small

ENCODERS = ["vim", "arm", "vit"]


def build(encoder_type, seed=0):
    torch.manual_seed(seed)
    return RRGVisionModel(tiny_vision_config(encoder_type)).eval()


def images(seed=1, b=2):
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_output_shapes(encoder_type):
    model = build(encoder_type)
    out = model(images(), output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 65, 64)
    assert out.pooler_output.shape == (2, 64)
    assert len(out.hidden_states) == 3 and all(h.shape == (2, 65, 64) for h in out.hidden_states)
    assert model(images()).hidden_states is None
    assert isinstance(model(images(), return_dict=False), tuple)


def test_vim_cls_token_moved_to_position_zero():
    model = build("vim")
    x = images()
    raw, states = model.encoder(x, output_hidden_states=True)
    out = model(x, output_hidden_states=True)
    p = model.encoder.cls_position
    torch.testing.assert_close(out.last_hidden_state[:, 0], raw[:, p])
    torch.testing.assert_close(out.pooler_output, raw[:, p])
    torch.testing.assert_close(out.last_hidden_state[:, 1:], torch.cat([raw[:, :p], raw[:, p + 1 :]], 1))
    # the embedding state at index 0 is cls + its pos embed, for every image
    cls_embedding = model.encoder.cls_token[0, 0] + model.encoder.pos_embed[0, p]
    torch.testing.assert_close(out.hidden_states[0][:, 0], cls_embedding.expand(2, -1))


def test_arm_summary_token_is_patch_mean():
    model = build("arm")
    out = model(images(), output_hidden_states=True)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 1:].mean(1))
    torch.testing.assert_close(out.hidden_states[1][:, 0], out.hidden_states[1][:, 1:].mean(1))


@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_auto_round_trip(encoder_type, tmp_path):
    model = build(encoder_type)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).encoder_type == encoder_type
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RRGVisionModel)
    x = images()
    torch.testing.assert_close(loaded(x).last_hidden_state, model(x).last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("encoder_type", ENCODERS)
def test_gradients_reach_every_parameter(encoder_type):
    model = build(encoder_type).train()
    out = model(images(), output_hidden_states=True)
    (out.last_hidden_state.pow(2).mean() + out.pooler_output.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_arm_is_causal_in_raster_order():
    model = build("arm")
    x = images(b=1)
    changed = x.clone()
    changed[..., 56:, 48:56] += 1.0  # patch (7, 6): raster index 62 of 64
    a = model(x).last_hidden_state[:, 1:]
    b = model(changed).last_hidden_state[:, 1:]
    torch.testing.assert_close(a[:, :62], b[:, :62])
    assert not torch.allclose(a[:, 62:], b[:, 62:])


def test_vim_is_bidirectional():
    model = build("vim")
    x = images(b=1)
    changed = x.clone()
    changed[..., 56:, 56:] += 1.0  # the last patch
    # patch token 0 (position 1) must see a change at the end of the sequence
    assert not torch.allclose(model(x).last_hidden_state[:, 1], model(changed).last_hidden_state[:, 1])


def test_plugs_into_llava():
    vision = tiny_vision_config("vim")
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=63,
                         image_seq_length=vision.num_patches, vision_feature_layer=-1)
    assert isinstance(config.vision_config, RRGVisionConfig)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    assert isinstance(model.model.vision_tower, RRGVisionModel)
    input_ids = torch.cat([torch.full((1, 64), 63), torch.tensor([[1, 2, 3]])], 1)
    out = model(input_ids=input_ids, pixel_values=images(b=1), labels=input_ids)
    assert out.logits.shape == (1, 67, 64) and torch.isfinite(out.loss)
    feats = model.model.get_image_features(pixel_values=images(b=1))
    assert feats.pooler_output[0].shape == (64, 32)


def test_named_configs_have_published_sizes():
    # Vim-S is published as 26M parameters (incl. a 0.4M ImageNet head we do not model), Vim-B as 98M
    with torch.device("meta"):
        small = RRGVisionModel(vim_small())
        base = RRGVisionModel(vim_base())
    n_small = sum(p.numel() for p in small.parameters())
    n_base = sum(p.numel() for p in base.parameters())
    assert 25.0e6 < n_small < 26.5e6
    assert 96e6 < n_base < 99e6
    assert small.encoder.pos_embed.shape == (1, 197, 384)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="encoder_type"):
        RRGVisionConfig(encoder_type="resnet")
    with pytest.raises(ValueError, match="patch_size"):
        RRGVisionConfig(image_size=64, patch_size=7)
    with pytest.raises(ValueError, match="num_attention_heads"):
        RRGVisionConfig(encoder_type="vit", hidden_size=64, num_attention_heads=5)
