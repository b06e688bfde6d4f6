import pytest

from rewards.base import Reward, RewardOutput, TextCache, completion_text, score_nonempty, trl_call


def test_reward_output_log_means_and_validation():
    out = RewardOutput([1.0, 2.0, 6.0], {"a": [0.0, 0.0, 3.0]})
    assert out.log("reward/x") == {"reward/x": 3.0, "reward/x/a": 1.0}
    assert RewardOutput([]).log() == {}
    with pytest.raises(ValueError, match=r"sub_scores\['a'\] has 2 values but scores has 3"):
        RewardOutput([1.0, 2.0, 3.0], {"a": [1.0, 2.0]})


def test_completion_text_handles_trl_formats():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "Lungs clear."}]) == "Lungs clear."
    multimodal = [{"role": "assistant", "content": [{"type": "text", "text": "No effusion."}, {"type": "image"}]}]
    assert completion_text(multimodal) == "No effusion."
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    with pytest.raises(TypeError, match="role"):
        completion_text([["not", "a", "dict"]])
    with pytest.raises(TypeError, match="string or a list"):
        completion_text(42)


class _Length:
    """A toy reward (hypothesis length minus reference length) to exercise the shared plumbing."""

    name = __name__ = "length"
    worst = -100.0

    def __init__(self):
        self.seen = []

    def score(self, completions, references):
        return score_nonempty(completions, references, self._score, self.worst, {"ref_len": -1.0})

    def _score(self, hyps, refs):
        self.seen.append(list(hyps))
        return RewardOutput(
            [float(len(h) - len(r)) for h, r in zip(hyps, refs, strict=True)], {"ref_len": [len(r) for r in refs]}
        )

    __call__ = trl_call


def test_score_nonempty_fills_worst_and_skips_scoring_empties():
    reward = _Length()
    out = reward.score(["abc", "  ", "", "abcdef"], ["ab", "x", "y", "abc"])
    assert out.scores == [1.0, -100.0, -100.0, 3.0]
    assert out.sub_scores == {"ref_len": [2, -1.0, -1.0, 3]}
    assert reward.seen == [["abc", "abcdef"]]
    assert reward.score(["", ""], ["a", "b"]).scores == [-100.0, -100.0]
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        reward.score(["a", "b"], ["a"])


def test_trl_call_signature_and_metric_hook():
    reward = _Length()
    assert isinstance(reward, Reward)
    logged = {}
    got = reward(
        prompts=["p1", "p2"],
        completions=[[{"role": "assistant", "content": "abcd"}], [{"role": "assistant", "content": "a"}]],
        completion_ids=[[1, 2], [3]],
        reference=["ab", "abc"],
        trainer_state=None,
        log_extra=None,
        log_metric=logged.__setitem__,
        image_path=["x.png", "y.png"],
    )
    assert got == [2.0, -2.0]
    assert logged == {"length/ref_len": 2.5}


def test_text_cache_is_bounded_lru_and_batches_misses():
    calls = []

    def compute(texts):
        calls.append(list(texts))
        return [t.upper() for t in texts]

    cache = TextCache(maxsize=2)
    assert cache.get_many(["a", "b", "a"], compute) == ["A", "B", "A"]
    assert calls == [["a", "b"]]
    assert (cache.hits, cache.misses) == (1, 2)
    cache.get_many(["a"], compute)  # "a" becomes most recent, so "b" is evicted next
    cache.get_many(["c"], compute)
    cache.get_many(["a", "b"], compute)
    assert calls == [["a", "b"], ["c"], ["b"]]
    assert len(cache) == 2
    with pytest.raises(ValueError, match="maxsize"):
        TextCache(0)
    with pytest.raises(ValueError, match="1 values for 2 texts"):
        TextCache().get_many(["x", "y"], lambda ts: ["X"])
