import numpy as np
import pytest

from rewards.nlg import Bleu2RadCliQ
from rewards.radcliq import RadCliQReward, radcliq


def test_v1_published_anchor_values():
    assert radcliq([[1, 1, 1, 1]], "v1")[0] == pytest.approx(-1.44069, abs=1e-5)
    assert radcliq([[0, 0, 0, 0]], "v1")[0] == pytest.approx(2.45014, abs=1e-5)


def test_v0_hand_computed():
    # Perfect report, term by term ((1 - mean) / scale * coef), rounded to 5 decimals:
    # radgraph 1.52456 * -0.47963 = -0.73123; bertscore 1.64128 * -0.67622 = -1.10986;
    # s_emb 0.92250 * -0.46367 = -0.42773; bleu2 1.77760 * 0.21659 = 0.38501; + intercept 1.64167.
    assert radcliq([[1, 1, 1, 1]], "v0")[0] == pytest.approx(
        -0.73123 - 1.10986 - 0.42773 + 0.38501 + 1.64167, abs=5e-5
    )
    # All zeros: -mean / scale * coef summed, + intercept.
    # 1.78852*0.47963 + 2.80970*0.67622 + 3.11788*0.46367 - 1.51874*0.21659 + 1.64167
    expected = 1.78852 * 0.47963 + 2.80970 * 0.67622 + 3.11788 * 0.46367 - 1.51874 * 0.21659 + 1.64167
    assert radcliq([[0, 0, 0, 0]], "v0")[0] == pytest.approx(expected, abs=5e-5)


def test_radcliq_is_row_wise_and_validates():
    rows = np.array([[1, 1, 1, 1], [0.5, 0.6, 0.7, 0.3], [0, 0, 0, 0]], dtype=float)
    batch = radcliq(rows, "v1")
    assert batch.shape == (3,)
    np.testing.assert_allclose(batch, [radcliq(r[None], "v1")[0] for r in rows])
    # v1's BLEU coefficient is ~0: changing BLEU-2 alone moves the score by < 1e-10.
    assert abs(radcliq([[0.5, 0.5, 0.5, 0.0]])[0] - radcliq([[0.5, 0.5, 0.5, 1.0]])[0]) < 1e-10
    with pytest.raises(ValueError, match="shape"):
        radcliq([1, 1, 1, 1])
    with pytest.raises(ValueError, match="version"):
        radcliq([[1, 1, 1, 1]], "v2")


class _Fixed:
    """Stand-in model scorer: a deterministic function of the pair, counting calls."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def score(self, hyps, refs, level=None):
        self.calls += 1
        if level is not None:
            assert level == "radcliq"
        return [self.fn(h, r) for h, r in zip(hyps, refs, strict=True)]


def test_reward_is_negative_radcliq_of_the_components():
    radgraph = _Fixed(lambda h, r: 0.25 * len(h) / len(r))
    bertscore = _Fixed(lambda h, r: 0.5)
    semb = _Fixed(lambda h, r: 0.9 if h.split()[0] == r.split()[0] else 0.1)
    reward = RadCliQReward(radgraph=radgraph, bertscore=bertscore, semb=semb)
    hyps = ["Mild cardiomegaly.", "No effusion.", ""]
    refs = ["Mild cardiomegaly. No effusion.", "Small effusion.", "Lungs clear."]
    out = reward.score(hyps, refs)
    bleu2 = Bleu2RadCliQ().score(hyps[:2], refs[:2]).scores
    components = [
        [0.25 * len(h) / len(r), 0.5, s, b] for h, r, s, b in zip(hyps[:2], refs[:2], (0.9, 0.1), bleu2, strict=True)
    ]
    np.testing.assert_allclose(out.scores[:2], -radcliq(components, "v1"))
    assert out.scores[2] == pytest.approx(-2.45014, abs=1e-5)  # empty report: all components 0
    assert out.sub_scores["bleu2"][:2] == pytest.approx(bleu2)
    assert out.sub_scores["semb"] == pytest.approx([0.9, 0.1, 0.0])
    assert out.sub_scores["radcliq"][2] == pytest.approx(2.45014, abs=1e-5)
    reward.score(hyps, refs)
    assert radgraph.calls == bertscore.calls == semb.calls == 2  # scorers built once, reused
    logged = out.log("reward/radcliq_v1")
    assert set(logged) == {"reward/radcliq_v1"} | {f"reward/radcliq_v1/{k}" for k in out.sub_scores}
    assert reward.__name__ == "radcliq_v1"


def test_trl_call_forwards_sub_scores_to_log_metric():
    reward = RadCliQReward(
        radgraph=_Fixed(lambda h, r: 1.0), bertscore=_Fixed(lambda h, r: 1.0), semb=_Fixed(lambda h, r: 1.0)
    )
    logged = {}
    got = reward(completions=["Lungs clear."], reference=["Lungs clear."], log_metric=logged.__setitem__)
    assert got == pytest.approx([1.44069], abs=1e-5)
    assert logged["radcliq_v1/bleu2"] == pytest.approx(1.0)


def test_missing_weights_raise_on_first_use(tmp_path):
    pytest.importorskip("rewards.radgraph")
    pytest.importorskip("rewards.bertscore")
    pytest.importorskip("rewards.chexbert")
    from rewards.weights import WeightsNotFoundError

    reward = RadCliQReward(radgraph_path=str(tmp_path / "nope.tar.gz"))
    with pytest.raises(WeightsNotFoundError):
        reward.score(["a"], ["b"])
