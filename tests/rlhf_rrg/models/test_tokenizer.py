import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_rrg.models.tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS, add_image_token, build_word_tokenizer

CORPUS = ["The heart is normal.", "No pleural effusion, no pneumothorax.", "Heart size is normal."]


def test_words_punctuation_and_case(tmp_path):
    tok = build_word_tokenizer(CORPUS)
    ids = tok("No EFFUSION, heart normal.")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "no", "effusion", ",", "heart", "normal", "."]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == list(SPECIAL_TOKENS)
    # 9 distinct words + 2 punctuation marks in CORPUS, plus the 5 specials
    assert len(tok) == 5 + 11


def test_unknown_words_and_min_freq():
    tok = build_word_tokenizer(CORPUS, min_freq=2)
    # only "heart", "is", "normal", "." and "no" occur twice or more
    assert set(tok.get_vocab()) == set(SPECIAL_TOKENS) | {"heart", "is", "normal", ".", "no"}
    assert tok("pneumothorax")["input_ids"] == [tok.bos_token_id, tok.unk_token_id]
    with pytest.raises(ValueError, match="min_freq"):
        build_word_tokenizer(CORPUS, min_freq=0)
    with pytest.raises(ValueError, match="no word"):
        build_word_tokenizer(CORPUS, min_freq=100)


def test_image_token_is_atomic_and_decode_skips_specials():
    tok = build_word_tokenizer(CORPUS)
    ids = tok(IMAGE_TOKEN * 3 + "heart is normal.")["input_ids"]
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids[:4] == [tok.bos_token_id, image_id, image_id, image_id]
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == "heart is normal ."


def test_save_load_round_trip(tmp_path):
    tok = build_word_tokenizer(CORPUS, out_dir=tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    text = "<image> no pleural effusion, heart normal."
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    specials = (loaded.pad_token, loaded.bos_token, loaded.eos_token, loaded.unk_token)
    assert specials == ("<pad>", "<s>", "</s>", "<unk>")
    assert loaded.image_token == IMAGE_TOKEN


def test_add_image_token_to_a_pretrained_style_tokenizer():
    backend = Tokenizer(WordLevel({"a": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    image_id = add_image_token(tok)
    assert image_id == 3 and len(tok) == 4
    assert tok.pad_token == "</s>"
    assert tok("a<image>a")["input_ids"] == [0, 3, 0]
    assert add_image_token(tok) == 3 and len(tok) == 4  # idempotent
