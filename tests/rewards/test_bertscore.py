"""BERTScore: rescaling vs a direct computation and vs bert_score.score, empty strings, batching, cache, errors."""

import bert_score
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from rewards.bertscore import BASELINE_PATH, BertScorer, read_baseline_f1
from rewards.weights import WeightsNotFoundError
from rlhf_rrg.testing.tiny_reward_weights import write_tiny_distilroberta

HYPS = ["no acute cardiopulmonary process.", "mild cardiomegaly with small left pleural effusion",
        "the lungs are clear", "heart size normal"]
REFS = ["no acute process", "moderate cardiomegaly with left effusion", "the lungs are clear",
        "normal heart size, clear lungs"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_distilroberta(tmp_path_factory.mktemp("bertscore") / "distilroberta")


@pytest.fixture(scope="module")
def scorer(model_dir):
    return BertScorer(str(model_dir), batch_size=3)


def test_package_baseline_for_distilroberta_layer_5():
    assert read_baseline_f1(BASELINE_PATH, 5) == pytest.approx(0.8473319)
    with pytest.raises(ValueError, match="LAYER=99"):
        read_baseline_f1(BASELINE_PATH, 99)


def _direct_f1(model, tokenizer, hyp: str, ref: str) -> float:
    """Greedy cosine matching on layer-5 token vectors with uniform weights on the non-special tokens.

    As in BERTScore, <s> and </s> get weight 0 but stay candidates for the other side's greedy match.
    """
    def vectors(text):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[5][0]
        return torch.nn.functional.normalize(hidden, dim=-1)

    h, r = vectors(hyp), vectors(ref)
    sim = h @ r.T
    precision = sim.max(1).values[1:-1].mean().item()
    recall = sim.max(0).values[1:-1].mean().item()
    return 2 * precision * recall / (precision + recall)


def test_rescaled_f1_matches_direct_computation(model_dir, scorer):
    model = AutoModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, add_prefix_space=True)
    baseline = 0.8473319
    direct = [_direct_f1(model, tokenizer, h, r) for h, r in zip(HYPS, REFS, strict=True)]
    expected = [(f - baseline) / (1 - baseline) for f in direct]
    assert scorer.score(HYPS, REFS) == pytest.approx(expected, abs=1e-4)
    assert scorer.score(REFS[2:3], REFS[2:3]) == pytest.approx([1.0], abs=1e-5)


def test_matches_bert_score_package(model_dir, scorer):
    _, _, f1 = bert_score.score(HYPS, REFS, model_type=str(model_dir), num_layers=5, idf=False,
                                rescale_with_baseline=True, baseline_path=str(BASELINE_PATH), lang="en")
    assert scorer.score(HYPS, REFS) == pytest.approx(f1.tolist(), abs=1e-4)


def test_empty_strings_score_worst_without_crashing(scorer):
    worst = (0 - 0.8473319) / (1 - 0.8473319)
    assert scorer.worst == pytest.approx(worst)
    scores = scorer.score(["", HYPS[0], "   "], [REFS[0], "", REFS[1]])
    assert scores == pytest.approx([worst] * 3)
    assert scorer.score([], []) == []


def test_runs_of_spaces_are_collapsed_like_cxr_report_metric(scorer):
    spaced = scorer.score(["no  acute   process", "heart size normal"], ["no acute process", "heart  size normal"])
    plain = scorer.score(["no acute process", "heart size normal"], ["no acute process", "heart size normal"])
    assert spaced == pytest.approx(plain, abs=1e-6)
    # Only spaces: CXR-Report-Metric's re.sub(" +", " ") leaves a newline in place.
    assert scorer.score(["no acute\nprocess"], ["no acute process"])[0] != pytest.approx(plain[0], abs=1e-6)


def test_batching_and_reference_cache(model_dir, scorer):
    one = BertScorer(str(model_dir), batch_size=1)
    assert one.score(HYPS, REFS) == pytest.approx(scorer.score(HYPS, REFS), abs=1e-5)
    scorer._cache.clear()
    scorer.score(HYPS, REFS + [])
    assert list(scorer._cache) == REFS
    cached = scorer._cache[REFS[0]][0].clone()
    scorer.score(HYPS, REFS)  # greedy matching normalises in place: the cache must stay untouched
    torch.testing.assert_close(scorer._cache[REFS[0]][0], cached)
    with pytest.raises(ValueError, match="same length"):
        scorer.score(HYPS, REFS[:1])


def test_missing_model_names_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RRG_BERTSCORE_MODEL", "HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(WeightsNotFoundError) as info:
        BertScorer()
    message = str(info.value)
    assert "distilroberta-base" in message and "$RRG_BERTSCORE_MODEL" in message
    hub = tmp_path / ".cache" / "huggingface" / "hub"
    assert str(hub / "models--distilroberta-base" / "snapshots" / "<refs/main>") in message
