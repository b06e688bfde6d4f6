"""Weight resolution order and the not-found message."""

from pathlib import Path

import pytest
from transformers import BertTokenizerFast

from rewards.weights import (
    WeightsNotFoundError,
    hf_hub_cache_dirs,
    load_tokenizer,
    resolve_weights,
    user_cache_dir,
)
from rlhf_rrg.testing.tiny_reward_weights import build_wordpiece_tokenizer


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "RRG_TEST_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_explicit_path_wins_over_env(tmp_path, monkeypatch):
    explicit, env = _touch(tmp_path / "a" / "w.pth"), _touch(tmp_path / "b" / "w.pth")
    monkeypatch.setenv("RRG_TEST_WEIGHTS", str(env))
    assert resolve_weights("w.pth", str(explicit), "RRG_TEST_WEIGHTS", []) == explicit
    assert resolve_weights("w.pth", None, "RRG_TEST_WEIGHTS", []) == env


def test_explicit_or_env_pointing_nowhere_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(WeightsNotFoundError, match="explicit path.*missing.pth"):
        resolve_weights("w.pth", str(tmp_path / "missing.pth"), "RRG_TEST_WEIGHTS", [])
    monkeypatch.setenv("RRG_TEST_WEIGHTS", str(tmp_path / "gone.pth"))
    with pytest.raises(WeightsNotFoundError, match=r"\$RRG_TEST_WEIGHTS.*gone.pth"):
        resolve_weights("w.pth", None, "RRG_TEST_WEIGHTS", [])


def test_hf_cache_file_and_repo_snapshot(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub = tmp_path / "hf" / "hub"
    assert hf_hub_cache_dirs()[0] == hub
    file = _touch(hub / "models--StanfordAIMI--RRG_scorers" / "snapshots" / "abc" / "chexbert.pth")
    assert resolve_weights("chexbert.pth", None, "RRG_TEST_WEIGHTS", []) == file
    snapshot = hub / "models--distilroberta-base" / "snapshots" / "123"
    snapshot.mkdir(parents=True)
    assert resolve_weights("distilroberta-base", None, "RRG_TEST_WEIGHTS", []) == snapshot


def test_candidates_are_globbed_after_the_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir("radgraph") == tmp_path / "xdg" / "radgraph"
    found = _touch(user_cache_dir("radgraph") / "0.1.18" / "radgraph.tar.gz")
    pattern = str(user_cache_dir("radgraph") / "*" / "radgraph.tar.gz")
    assert resolve_weights("radgraph.tar.gz", None, "RRG_TEST_WEIGHTS", [pattern]) == found


def test_not_found_message_names_file_env_and_every_place(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights("chexbert.pth", None, "RRG_TEST_WEIGHTS", ["/nowhere/chexbert.pth"])
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "'chexbert.pth'" in message and "$RRG_TEST_WEIGHTS (not set)" in message
    assert "/nowhere/chexbert.pth" in message
    hub = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    assert str(hub / "models--*" / "snapshots" / "*" / "chexbert.pth") in message


def test_hf_cache_follows_refs_main_not_the_last_sorted_snapshot(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / "models--distilroberta-base"
    current, stale = repo / "snapshots" / "aaa", repo / "snapshots" / "zzz"
    current.mkdir(parents=True)
    stale.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa")
    assert resolve_weights("distilroberta-base", None, "RRG_TEST_WEIGHTS", []) == current
    files = tmp_path / "hf" / "hub" / "models--StanfordAIMI--RRG_scorers"
    main_file = _touch(files / "snapshots" / "111" / "chexbert.pth")
    stale_file = _touch(files / "snapshots" / "999" / "chexbert.pth")
    (files / "refs").mkdir()
    (files / "refs" / "main").write_text("111\n")
    assert resolve_weights("chexbert.pth", None, "RRG_TEST_WEIGHTS", []) == main_file != stale_file


def test_ambiguous_or_dangling_hf_cache_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / "models--distilroberta-base"
    (repo / "snapshots" / "aaa").mkdir(parents=True)
    (repo / "snapshots" / "bbb").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"models--distilroberta-base: 2 snapshots and no refs/main"):
        resolve_weights("distilroberta-base", None, "RRG_TEST_WEIGHTS", [])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ccc")
    with pytest.raises(ValueError, match=r"refs/main names snapshot 'ccc'"):
        resolve_weights("distilroberta-base", None, "RRG_TEST_WEIGHTS", [])


def test_load_tokenizer_refuses_folders_that_would_make_every_word_unknown(tmp_path):
    good = tmp_path / "good"
    build_wordpiece_tokenizer().save_pretrained(good)
    assert load_tokenizer(good).tokenize("effusion") != ["[UNK]"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match=rf"{empty}: no tokenizer vocabulary"):
        load_tokenizer(empty)
    specials = tmp_path / "specials"
    specials.mkdir()
    (specials / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    BertTokenizerFast(vocab_file=str(specials / "vocab.txt")).save_pretrained(specials)
    with pytest.raises(ValueError, match=rf"{specials}: the tokenizer maps 'effusion' to its unknown token '\[UNK\]'"):
        load_tokenizer(specials)
