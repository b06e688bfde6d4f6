import pytest
import torch
from transformers import BertModel

from rlhf_rrg.config import ConfigError, load_config
from rlhf_rrg.models.text_encoder import TextEncoderConfig, build_text_encoder, pool_hidden_states, tiny_text_encoder

REPORTS = ["The heart size is normal.", "Small left pleural effusion, no pneumothorax."]


def test_tiny_encoder_has_the_real_layout_and_loads_through_auto_classes(tmp_path):
    path = tiny_text_encoder(REPORTS, tmp_path / "enc", hidden_size=16)
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    model, tokenizer = build_text_encoder(path)
    assert isinstance(model, BertModel) and model.config.hidden_size == 16

    batch = tokenizer(REPORTS, padding=True, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][1])
    assert tokens[:6] == ["[CLS]", "small", "left", "pleural", "effusion", ","]
    assert tokenizer.unk_token_id not in batch["input_ids"].tolist()[0]
    out = model(**batch)
    assert out.last_hidden_state.shape == (2, batch["input_ids"].shape[1], 16)


def test_tiny_encoder_is_deterministic_per_seed(tmp_path):
    a, _ = build_text_encoder(tiny_text_encoder(REPORTS, tmp_path / "a", seed=3))
    b, _ = build_text_encoder(tiny_text_encoder(REPORTS, tmp_path / "b", seed=3))
    c, _ = build_text_encoder(tiny_text_encoder(REPORTS, tmp_path / "c", seed=4))
    wa, wb, wc = (m.embeddings.word_embeddings.weight for m in (a, b, c))
    torch.testing.assert_close(wa, wb)
    assert not torch.allclose(wa, wc)


def test_build_text_encoder_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_text_encoder(tmp_path / "nowhere")


def test_pooling_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "cls"), torch.tensor([[1.0, 2.0], [5.0, 6.0]]))
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "mean"), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))
    with pytest.raises(ValueError, match="all zeros"):
        pool_hidden_states(hidden, torch.zeros(2, 3), "mean")
    with pytest.raises(ValueError, match="mask"):
        pool_hidden_states(hidden, mask[:, :2], "mean")


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="pooling"):
        TextEncoderConfig(pooling="max")
    with pytest.raises(ValueError, match="max_length"):
        TextEncoderConfig(max_length=1)
    cfg_file = tmp_path / "enc.yaml"
    cfg_file.write_text("path: /models/cxr-bert\npooling: mean\n")
    assert load_config(TextEncoderConfig, cfg_file).pooling == "mean"
    with pytest.raises(ConfigError, match="poolng"):
        load_config(TextEncoderConfig, cfg_file, ["--poolng", "cls"])
