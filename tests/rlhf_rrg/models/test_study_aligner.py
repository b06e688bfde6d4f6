import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from rlhf_rrg.export.aligner import load_aligner, save_aligner
from rlhf_rrg.losses.contrastive import ClipLoss
from rlhf_rrg.models.study_aligner import StudyAlignerConfig, build_study_aligner
from rlhf_rrg.models.text_encoder import build_text_encoder, tiny_text_encoder
from rlhf_rrg.models.vision import tiny_vision_config

REPORTS = ["heart size is normal .", "small left pleural effusion .", "right pneumothorax ."]


def make(tmp_path, view_pooling="first", **kwargs):
    torch.manual_seed(0)
    text, tokenizer = build_text_encoder(tiny_text_encoder(REPORTS, tmp_path / "text", hidden_size=16))
    vision = AutoModel.from_config(tiny_vision_config("vit"))
    model = build_study_aligner(vision, text, "mean", ClipLoss(0.1), 8, view_pooling, **kwargs)
    return model, tokenizer


def test_mean_view_pooling_is_the_renormalised_mean_of_view_embeddings(tmp_path):
    model, _ = make(tmp_path, "mean")
    pixels = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        study = model.encode_study(pixels)
        views = [model.aligner.encode_image(pixels[:, v]) for v in range(3)]
    expected = F.normalize(sum(views) / 3, dim=-1)
    torch.testing.assert_close(study, expected)
    assert torch.allclose(study.norm(dim=-1), torch.ones(2))


def test_first_view_pooling_ignores_other_views(tmp_path):
    model, _ = make(tmp_path, "first")
    pixels = torch.randn(2, 2, 3, 64, 64)
    other = pixels.clone()
    other[:, 1] = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_study(pixels), model.encode_study(other))
        torch.testing.assert_close(model.encode_study(pixels), model.aligner.encode_image(pixels[:, 0]))
    with pytest.raises(ValueError, match=r"\(b, V, c, h, w\)"):
        model.encode_study(pixels[:, 0])


def test_forward_loss_equals_clip_loss_of_the_embeddings(tmp_path):
    model, tokenizer = make(tmp_path, "mean")
    tokens = tokenizer(REPORTS, padding=True, return_tensors="pt")
    pixels = torch.randn(3, 2, 3, 64, 64)
    out = model(pixels, tokens["input_ids"], tokens["attention_mask"])
    with torch.no_grad():
        image = model.encode_study(pixels)
        text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(out.image_embeds, image)
    torch.testing.assert_close(out.loss, model.aligner.loss(image, text))


def test_freezing_and_the_unused_text_pooler(tmp_path):
    model, _ = make(tmp_path, freeze_vision=True)
    aligner = model.aligner
    assert not any(p.requires_grad for p in aligner.vision_encoder.parameters())
    assert not any(p.requires_grad for p in aligner.text_encoder.pooler.parameters())
    trainable_text = [n for n, p in aligner.text_encoder.named_parameters() if p.requires_grad]
    assert trainable_text and not any(n.startswith("pooler") for n in trainable_text)
    assert aligner.image_proj.weight.requires_grad and aligner.loss.logit_scale.requires_grad


def test_save_and_load_round_trip(tmp_path):
    model, tokenizer = make(tmp_path, "mean")
    with torch.no_grad():
        model.aligner.loss.logit_scale.fill_(2.5)
    save_aligner(model, tokenizer, tmp_path / "export")
    loaded, loaded_tokenizer = load_aligner(tmp_path / "export")
    assert loaded.view_pooling == "mean" and loaded.aligner.text_pooling == "mean"
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded.aligner.loss.max_log_scale == pytest.approx(model.aligner.loss.max_log_scale)
    reference = model.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, reference[name], msg=name)
    model.eval()
    pixels = torch.randn(2, 2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_study(pixels), model.encode_study(pixels))


def test_load_names_the_missing_part(tmp_path):
    model, tokenizer = make(tmp_path)
    save_aligner(model, tokenizer, tmp_path / "export")
    (tmp_path / "export" / "heads.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="heads.safetensors"):
        load_aligner(tmp_path / "export")


def test_config_validation():
    with pytest.raises(ValueError, match="model.view_pooling"):
        StudyAlignerConfig(view_pooling="concat")
    with pytest.raises(ValueError, match="model.embed_dim"):
        StudyAlignerConfig(embed_dim=0)
