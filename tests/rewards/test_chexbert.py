"""CheXbert loader: parity with f1chexbert's own model/tokenisation, batching, caching, similarity, errors."""

from collections import OrderedDict

import pandas as pd
import pytest
import torch

from rewards.chexbert import MAX_LENGTH, CheXbert, CheXbertSimilarity, encode_report
from rewards.weights import WeightsNotFoundError
from rlhf_rrg.testing.tiny_reward_weights import write_tiny_bert, write_tiny_chexbert

TEXTS = ["no acute cardiopulmonary process.", "Mild cardiomegaly\n with  small left pleural effusion", "",
         "the lungs are clear", "moderate edema"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexbert")
    bert = write_tiny_bert(root / "bert")
    return {"bert": bert, "ckpt": write_tiny_chexbert(root / "chexbert.pth", bert)}


@pytest.fixture(scope="module")
def model(paths):
    return CheXbert.load(str(paths["ckpt"]), tokenizer_path=str(paths["bert"]))


def test_labels_equal_the_f1chexbert_model(paths, model, monkeypatch):
    from f1chexbert.f1chexbert import bert_labeler, generate_attention_masks, tokenize
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    # transformers<5 encode_plus on a token list: [CLS] + ids + [SEP].
    monkeypatch.setattr(PreTrainedTokenizerBase, "encode_plus", lambda self, tokens: {
        "input_ids": [self.cls_token_id, *self.convert_tokens_to_ids(tokens), self.sep_token_id]}, raising=False)
    reference = bert_labeler(pretrain_path=str(paths["bert"]))
    state = torch.load(paths["ckpt"])["model_state_dict"]
    reference.load_state_dict(OrderedDict((k.replace("module.", ""), v) for k, v in state.items()))
    reference.eval()
    labels, vectors = [], []
    for text in TEXTS:
        ids = torch.LongTensor(tokenize(pd.Series([text]), model.tokenizer))
        mask = generate_attention_masks(ids, [ids.shape[1]], "cpu")
        with torch.no_grad():
            labels.append([head.argmax(1).item() for head in reference(ids, mask)])
            vectors.append(reference.bert(ids, attention_mask=mask)[0][0, 0])
    assert model.label(TEXTS, use_cache=False).tolist() == labels
    torch.testing.assert_close(model.embed(TEXTS, use_cache=False), torch.stack(vectors), rtol=1e-4, atol=1e-4)


def test_label_codes_shape_and_range(model):
    labels = model.label(TEXTS)
    assert labels.shape == (len(TEXTS), 14) and labels.dtype == torch.long
    assert labels[:, :13].min() >= 0 and labels[:, :13].max() <= 3
    assert set(labels[:, 13].tolist()) <= {0, 1}
    assert len(set(map(tuple, labels.tolist()))) > 1  # the tiny model does tell reports apart
    assert model.embed(TEXTS).shape == (len(TEXTS), model.bert.config.hidden_size)


def test_truncation_and_empty_encoding(model):
    tok = model.tokenizer
    assert encode_report(tok, "   ") == [tok.cls_token_id, tok.sep_token_id]
    long_ids = encode_report(tok, "pleural effusion " * 400)
    assert len(long_ids) == MAX_LENGTH and long_ids[0] == tok.cls_token_id and long_ids[-1] == tok.sep_token_id
    assert model.label(["pleural effusion " * 400], use_cache=False).shape == (1, 14)


def test_batching_equals_one_by_one(model):
    batched = model.embed(TEXTS, use_cache=False)
    single = torch.cat([model.embed([t], use_cache=False) for t in TEXTS])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
    assert model.label(TEXTS, use_cache=False).tolist() == torch.cat(
        [model.label([t], use_cache=False) for t in TEXTS]).tolist()


def test_cache_avoids_recomputation(model):
    model._cache.clear()
    calls = []
    handle = model.bert.register_forward_hook(lambda *_: calls.append(1))
    try:
        first = model.embed(TEXTS[:3] + TEXTS[:1])
        assert len(model._cache) == 3 and len(calls) == 1
        torch.testing.assert_close(model.embed(TEXTS[:3]), first[:3])
        model.label(TEXTS[:3])
        assert len(calls) == 1
    finally:
        handle.remove()


def test_similarity_is_cosine_and_empty_hyp_is_zero(model):
    sim = CheXbertSimilarity(model)
    hyps, refs = [TEXTS[0], "", TEXTS[3], TEXTS[4]], [TEXTS[1], TEXTS[1], TEXTS[3], TEXTS[0]]
    scores = sim.score(hyps, refs)
    h, r = model.embed([hyps[0]]), model.embed([refs[0]])
    assert scores[0] == pytest.approx((h @ r.T / (h.norm() * r.norm())).item(), abs=1e-5)
    assert scores[1] == 0.0 and scores[2] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="same length"):
        sim.score(hyps, refs[:1])


def test_missing_checkpoint_names_the_places_searched(tmp_path, monkeypatch, paths):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for var in ("RRG_CHEXBERT_PATH", "HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(WeightsNotFoundError) as info:
        CheXbert.load(tokenizer_path=str(paths["bert"]))
    message = str(info.value)
    assert "chexbert.pth" in message and "$RRG_CHEXBERT_PATH" in message
    assert str(tmp_path / "xdg" / "chexbert" / "chexbert.pth") in message
    monkeypatch.delenv("RRG_BERT_TOKENIZER", raising=False)
    with pytest.raises(WeightsNotFoundError, match="bert-base-uncased"):
        CheXbert.load(str(paths["ckpt"]))


def test_non_checkpoint_file_is_named(tmp_path, paths):
    for content in (b"not a checkpoint", b""):
        bad = tmp_path / "chexbert.pth"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=rf"{bad}: not a readable PyTorch checkpoint"):
            CheXbert.load(str(bad), tokenizer_path=str(paths["bert"]))
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match=rf"{bad}: expected a dict with 'model_state_dict', got \['state_dict'\]"):
        CheXbert.load(str(bad), tokenizer_path=str(paths["bert"]))


def test_tokenizer_folder_without_vocabulary_is_refused(tmp_path, paths):
    # A folder with config.json but no vocabulary would load as a special-tokens-only tokenizer (every word [UNK]).
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_bytes((paths["bert"] / "config.json").read_bytes())
    with pytest.raises(ValueError, match=rf"{bert}: no tokenizer vocabulary"):
        CheXbert.load(str(paths["ckpt"]), tokenizer_path=str(bert))
