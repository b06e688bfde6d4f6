import math
import subprocess
import threading
from collections import Counter

import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from rewards.nlg import (
    Bleu2RadCliQ,
    BleuReward,
    CiderDReward,
    RougeLReward,
    _SharedMeteor,
    corpus_nlg_scores,
    java_available,
    r2gen_tokenize,
)

REFS = [
    "The heart size is normal. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly. Small right pleural effusion, unchanged.",
    "Lungs are clear. No acute cardiopulmonary process.",
    "There is a left lower lobe consolidation concerning for pneumonia.",
    "Endotracheal tube terminates 4 cm above the carina. Lungs are clear.",
]
HYPS = [
    "Heart size is normal. No effusion.",
    "Cardiomegaly with a small right pleural effusion.",
    "The lungs are clear. No acute process.",
    "Left lower lobe opacity, possibly pneumonia.",
    "Lungs clear.",
]


def _coco(hyps, refs):
    gts = {i: [r2gen_tokenize(r)] for i, r in enumerate(refs)}
    res = {i: [r2gen_tokenize(h)] for i, h in enumerate(hyps)}
    return gts, res


def test_r2gen_tokenize_matches_hand_tokenised():
    assert (
        r2gen_tokenize("The Heart is normal.  No effusion, (stable)!") == "the heart is normal . no effusion stable ."
    )
    assert r2gen_tokenize("1. Small left-sided effusion. 2. No pneumothorax.") == (
        "small left-sided effusion . no pneumothorax ."
    )
    assert r2gen_tokenize("Lungs clear...\nHeart: normal") == "lungs clear . heart normal ."
    # R2Gen maps a report without words to its sentence terminator.
    assert r2gen_tokenize("  ...  ") == "."


def test_r2gen_tokenize_keeps_the_period_of_empty_sentences():
    # R2Gen splits on ". " and keeps empty sentences, each contributing its " ." token.
    assert r2gen_tokenize("Lungs are clear. . No effusion.") == "lungs are clear . . no effusion ."
    assert r2gen_tokenize("Heart normal. (). Lungs clear.") == "heart normal . . lungs clear ."


def test_r2gen_tokenize_uses_the_dataset_cleaner():
    # The IU cleaner neither turns newlines into spaces nor collapses "__"; the MIMIC cleaner does both.
    report = "Heart normal.\nLungs clear. XXXX__ stable."
    assert r2gen_tokenize(report, "mimic_cxr") == "heart normal . lungs clear . xxxx stable ."
    assert r2gen_tokenize(report, "iu_xray") == "heart normal lungs clear . xxxx stable ."
    refs, hyps = [report], ["Heart normal. Lungs clear. XXXX stable."]
    bleu_iu = corpus_nlg_scores(hyps, refs, ("bleu",), cleaner="iu_xray")["bleu_1"]
    bleu_mimic = corpus_nlg_scores(hyps, refs, ("bleu",), cleaner="mimic_cxr")["bleu_1"]
    # MIMIC tokens are identical (BLEU-1 = 1); IU drops one "." from the reference: 8 of 9 hypothesis tokens match,
    # brevity penalty 1 (hypothesis longer).
    assert bleu_mimic == pytest.approx(1.0) and bleu_iu == pytest.approx(8 / 9, abs=1e-6)
    with pytest.raises(ValueError, match="cleaner"):
        r2gen_tokenize(report, "chexpert")


def test_per_report_rewards_use_the_given_cleaner():
    # On the IU cleaner the newline does not end a sentence, so the hypothesis' extra "." is unmatched.
    refs, hyps = ["Heart normal.\nLungs clear."], ["Heart normal. Lungs clear."]
    assert BleuReward(n=1).score(hyps, refs).scores == pytest.approx([1.0])
    assert BleuReward(n=1, cleaner="iu_xray").score(hyps, refs).scores[0] < 1.0
    assert RougeLReward().score(hyps, refs).scores == pytest.approx([1.0])
    assert RougeLReward(cleaner="iu_xray").score(hyps, refs).scores[0] < 1.0
    corpus = refs + ["No pleural effusion.", "Mild cardiomegaly.", "Small left pneumothorax."]
    iu_cider = CiderDReward(corpus, cleaner="iu_xray").score(hyps, refs).scores[0]
    assert iu_cider < CiderDReward(corpus).score(hyps, refs).scores[0]
    with pytest.raises(ValueError, match="cleaner must be one of"):
        RougeLReward(cleaner="padchest")


def test_radcliq_bleu_tokens_split_on_spaces_only():
    # CXR-Report-Metric: lower, " ." before each period, split(" "), empty tokens dropped; a newline stays in a token.
    assert Bleu2RadCliQ.tokenize("No effusion.\nHeart  normal.") == ["no", "effusion", ".\nheart", "normal", "."]


def test_corpus_scores_equal_pycocoevalcap():
    gts, res = _coco(HYPS, REFS)
    got = corpus_nlg_scores(HYPS, REFS, metrics=("bleu", "rouge_l", "cider"))
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        assert got[f"bleu_{n + 1}"] == pytest.approx(bleu[n], abs=1e-12)
    assert got["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert got["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert 0 < got["bleu_4"] < got["bleu_1"] < 1


def reference_corpus_bleu(hyps: list[str], refs: list[str], n: int) -> float:
    """Corpus BLEU-n from its definition (Papineni et al. 2002) on token strings, one reference each, no smoothing:
    clipped n-gram matches and hypothesis n-grams summed over the corpus, brevity penalty on summed lengths."""
    matches, guesses, hyp_len, ref_len = [0] * n, [0] * n, 0, 0
    for hyp, ref in zip(hyps, refs, strict=True):
        h, r = hyp.split(), ref.split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for k in range(1, n + 1):
            h_grams = Counter(tuple(h[i : i + k]) for i in range(len(h) - k + 1))
            r_grams = Counter(tuple(r[i : i + k]) for i in range(len(r) - k + 1))
            matches[k - 1] += sum(min(count, r_grams[gram]) for gram, count in h_grams.items())
            guesses[k - 1] += max(0, len(h) - k + 1)
    precision = math.prod(m / g for m, g in zip(matches, guesses, strict=True)) ** (1 / n)
    return precision * min(1.0, math.exp(1 - ref_len / hyp_len))


def test_an_empty_generation_is_scored_as_no_tokens():
    """R2Gen decodes an empty generation to no tokens; pycocoevalcap then scores that hypothesis as empty."""
    hyps, refs = [*HYPS, ""], [*REFS, "Heart size is normal."]
    got = corpus_nlg_scores(hyps, refs, metrics=("bleu", "rouge_l", "cider"))
    ref_tokens = [r2gen_tokenize(r) for r in refs]
    hyp_tokens = [r2gen_tokenize(h) for h in HYPS] + [""]
    for n in range(1, 5):
        assert got[f"bleu_{n}"] == pytest.approx(reference_corpus_bleu(hyp_tokens, ref_tokens, n), abs=1e-7)
    gts, res = {i: [r] for i, r in enumerate(ref_tokens)}, {i: [h] for i, h in enumerate(hyp_tokens)}
    assert got["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert got["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)


def test_an_empty_generation_earns_no_credit():
    # As "." it would match the reference's final period: BLEU-1 exp(1 - 5/1) > 0.
    alone = corpus_nlg_scores(["", " "], ["Heart size is normal."] * 2, metrics=("bleu", "rouge_l", "cider"))
    assert alone == {"bleu_1": 0.0, "bleu_2": 0.0, "bleu_3": 0.0, "bleu_4": 0.0, "rouge_l": 0.0, "cider": 0.0}
    assert BleuReward(1).score([""], ["Heart size is normal."]).scores == [0.0]


def test_corpus_scores_reject_bad_input():
    with pytest.raises(ValueError, match="unknown NLG metrics"):
        corpus_nlg_scores(HYPS, REFS, metrics=("bleu5",))
    with pytest.raises(ValueError, match="5 hypotheses but 4 references"):
        corpus_nlg_scores(HYPS, REFS[:4], metrics=("bleu",))


def test_meteor_skipped_without_java(monkeypatch, caplog):
    monkeypatch.setattr("rewards.nlg.shutil.which", lambda name: None)
    with caplog.at_level("WARNING", logger="rewards.nlg"):
        got = corpus_nlg_scores(HYPS, REFS, metrics=("meteor",))
    assert got == {}
    assert "java" in caplog.text


@pytest.mark.skipif(not java_available(), reason="pycocoevalcap's METEOR needs java")
def test_meteor_starts_one_jar_per_process_and_calls_share_no_statistics(monkeypatch):
    from pycocoevalcap.meteor import meteor

    started, start = [], meteor.Meteor.__init__

    def counted_start(self):
        started.append(self)
        start(self)

    monkeypatch.setattr(meteor.Meteor, "__init__", counted_start)
    shared = _SharedMeteor()
    monkeypatch.setattr("rewards.nlg._METEOR", shared)
    halves = [(HYPS[:3], REFS[:3]), (HYPS[2:], REFS[2:]), (HYPS[:3], REFS[:3])]
    got = [corpus_nlg_scores(h, r, metrics=("meteor",))["meteor"] for h, r in halves]
    assert len(started) == 1
    # The first call is a fresh jar's score; the third, after another split, is that score again.
    assert got[0] == got[2] != got[1]
    shared.close()


class _FakeJar:
    """Stands in for pycocoevalcap's Meteor (the restart logic is ours; starting a JVM takes seconds)."""

    started: list = []
    fail = False

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.meteor_p = subprocess.Popen(["sleep", "60"], stdin=subprocess.PIPE)
        self.started.append(self)

    def compute_score(self, gts, res):
        if self.fail:
            self.lock.acquire()
            raise BrokenPipeError("jar gone")
        return 0.25, []


def test_meteor_restarts_its_jar_after_a_failed_or_dead_one(monkeypatch):
    from pycocoevalcap.meteor import meteor

    monkeypatch.setattr(meteor, "Meteor", _FakeJar)
    monkeypatch.setattr(_FakeJar, "started", [])
    shared = _SharedMeteor()
    assert shared.score({}, {}) == shared.score({}, {}) == 0.25 and len(_FakeJar.started) == 1
    _FakeJar.started[0].meteor_p.kill()  # a jar that died between calls
    _FakeJar.started[0].meteor_p.wait()
    assert shared.score({}, {}) == 0.25 and len(_FakeJar.started) == 2
    monkeypatch.setattr(_FakeJar, "fail", True)
    with pytest.raises(BrokenPipeError):
        shared.score({}, {})
    failed = _FakeJar.started[1]
    assert failed.meteor_p.poll() is not None and not failed.lock.locked()  # stopped, and its lock free for __del__
    monkeypatch.setattr(_FakeJar, "fail", False)
    assert shared.score({}, {}) == 0.25 and len(_FakeJar.started) == 3
    shared.close()
    assert _FakeJar.started[2].meteor_p.poll() is not None


def test_bleu_reward_equals_pycoco_per_sample_scores():
    gts, res = _coco(HYPS, REFS)
    _, per_sample = Bleu(4).compute_score(gts, res, verbose=0)
    for n in (1, 4):
        out = BleuReward(n=n).score(HYPS, REFS)
        np.testing.assert_allclose(out.scores, per_sample[n - 1], atol=1e-12)
    assert BleuReward(4).score([REFS[0]], [REFS[0]]).scores[0] == pytest.approx(1.0)


def test_bleu2_radcliq_equals_nltk_recipe():
    smoothing = SmoothingFunction(epsilon=0.1).method1
    expected = [
        sentence_bleu(
            [r.lower().replace(".", " .").split()],
            h.lower().replace(".", " .").split(),
            weights=(0.5, 0.5),
            smoothing_function=smoothing,
        )
        for h, r in zip(HYPS, REFS, strict=True)
    ]
    reward = Bleu2RadCliQ()
    np.testing.assert_allclose(reward.score(HYPS, REFS).scores, expected, atol=1e-12)
    # A one-word hypothesis has no bigram: method1 adds epsilon 0.1 to the zero bigram count.
    # p1 = 1/1, p2 = 0.1/1 (zero numerator smoothed, denominator max(1, 0)), brevity penalty exp(1 - 3/1).
    assert reward.score(["heart"], ["heart is normal"]).scores[0] == pytest.approx(np.exp(1 - 3) * np.sqrt(0.1))


def test_rouge_l_reward_equals_pycoco():
    gts, res = _coco(HYPS, REFS)
    _, per_sample = Rouge().compute_score(gts, res)
    np.testing.assert_allclose(RougeLReward().score(HYPS, REFS).scores, per_sample, atol=1e-12)


def test_cider_d_reward_with_batch_corpus_equals_pycoco():
    gts, res = _coco(HYPS, REFS)
    _, per_sample = Cider().compute_score(gts, res)
    reward = CiderDReward(corpus=REFS)
    np.testing.assert_allclose(reward.score(HYPS, REFS).scores, per_sample, atol=1e-9)


def test_cider_d_uses_the_given_corpus_for_idf():
    # Tokens are "<word> ."; an n-gram in all N=3 documents gets idf log(3/3) = 0, an unseen one log(3).
    corpus = ["lungs are clear .", "lungs are not clear .", "lungs show effusion ."]
    reward = CiderDReward(corpus=corpus)
    # "lungs" and "." are in every document (zero vectors at n=1); the bigram "lungs ." is unseen: cosine 1.
    assert reward.score(["lungs"], ["lungs"]).scores[0] == pytest.approx(10 * (0 + 1 + 0 + 0) / 4)
    # "effusion" (df 1) and "effusion ." (df 1) both carry weight: cosine 1 at n=1 and n=2.
    assert reward.score(["effusion"], ["effusion"]).scores[0] == pytest.approx(10 * (1 + 1 + 0 + 0) / 4)


def test_empty_completions_get_worst_value_not_crash():
    for reward in (BleuReward(4), Bleu2RadCliQ(), RougeLReward(), CiderDReward(corpus=REFS)):
        out = reward.score(["", "   ", HYPS[2]], REFS[:3])
        assert out.scores[:2] == [reward.worst, reward.worst]
        assert out.scores[2] > 0


def test_trl_calling_convention_with_conversational_completions():
    reward = Bleu2RadCliQ()
    completions = [[{"role": "assistant", "content": h}] for h in HYPS]
    got = reward(prompts=["p"] * 5, completions=completions, completion_ids=[[1]] * 5, reference=REFS, id=range(5))
    assert got == reward.score(HYPS, REFS).scores
    assert reward.__name__ == "bleu2_radcliq"
    with pytest.raises(KeyError, match="reference"):
        reward(prompts=["p"], completions=["x"], report=["y"])
