import math

import pytest

from rewards import RewardOutput
from rewards.form import DistinctSentenceReward
from rewards.weights import WeightsNotFoundError
from rlhf_rrg.rl.scoring import (
    NonFiniteRewardError,
    RewardConfig,
    build_stage_reward,
    empty_report_reward,
    heldout_report_metrics,
    score_reports,
)


class CountingReward:
    name = __name__ = "words"
    worst = -1.0

    def __init__(self):
        self.seen = []

    def score(self, completions, references):
        self.seen += list(completions)
        chars = {"chars": [float(len(c)) for c in completions]}
        return RewardOutput([float(len(c.split())) for c in completions], chars)


def test_empty_reports_get_the_worst_reward_without_reaching_the_reward():
    reward = CountingReward()
    out = score_reports(reward, ["a b", "", "  ", "c"], ["r"] * 4, worst=-1.0)
    assert out.scores == [2.0, -1.0, -1.0, 1.0]
    assert reward.seen == ["a b", "c"]
    assert out.sub_scores["chars"] == [3.0, -1.0, -1.0, 1.0]


def test_nonfinite_reward_names_the_report():
    class NaNReward(CountingReward):
        def score(self, completions, references):
            return RewardOutput([math.nan if c == "bad" else 1.0 for c in completions])

    with pytest.raises(NonFiniteRewardError, match="'bad'"):
        score_reports(NaNReward(), ["ok", "bad"], ["r", "r"], worst=0.0)


def test_empty_reward_prefers_config_then_reward_worst():
    assert empty_report_reward(CountingReward(), None) == -1.0
    assert empty_report_reward(CountingReward(), 0.5) == 0.5

    class NoWorst:
        name = "user_fn"

    with pytest.raises(ValueError, match="reward.empty_reward"):
        empty_report_reward(NoWorst(), None)


def test_config_swaps_rewards_and_falls_back_without_weights(monkeypatch, tmp_path):
    composite = build_stage_reward(["chexpert_f1", "bleu2_radcliq"], [2.0, 1.0])
    assert composite.weights == [2.0, 1.0]
    out = composite.score(["moderate cardiomegaly ."], ["moderate cardiomegaly ."])
    assert set(out.sub_scores) >= {"chexpert_f1", "bleu2_radcliq"}
    assert out.scores[0] == pytest.approx(2.0 * out.sub_scores["chexpert_f1"][0] + out.sub_scores["bleu2_radcliq"][0])
    # No RadCliQ model weights anywhere: the default reward falls back to the weight-free clinical composite.
    for var in ("RADGRAPH_PATH", "CHEXBERT_PATH", "BERTSCORE_MODEL_PATH", "HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert build_stage_reward(["radcliq_v1"], None).name == "clinical_offline"
    user = build_stage_reward([f"{CountingReward.__module__}:CountingReward"], None)
    assert user.score(["a b c"], ["r"]).scores == [3.0]


def test_required_weights_turn_the_fallback_into_an_error_naming_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("RRG_RADGRAPH_PATH", str(tmp_path / "radgraph.tar.gz"))
    with pytest.raises(WeightsNotFoundError, match=rf"require_weights .*{tmp_path}/radgraph.tar.gz.* does not exist"):
        build_stage_reward(["radcliq_v1"], None, require_weights=True)
    assert build_stage_reward(["radcliq_v1"], None, require_weights=False).name == "clinical_offline"
    # Weight-free rewards have nothing to require.
    assert build_stage_reward(["chexpert_f1"], None, require_weights=True).name == "chexpert_f1"


def test_reward_config_validates_weights():
    with pytest.raises(ValueError, match="reward.weights"):
        RewardConfig(funcs=["bleu"], weights=[1.0, 2.0])


def test_heldout_report_metrics_adds_text_statistics_and_the_mean_reward():
    out = heldout_report_metrics(DistinctSentenceReward(), ["a . a .", "b . c ."], ["x y z w", "x y z w"], 0.0)
    assert out["reward"] == 0.75 and out["repeated_sentence_rate"] == 0.5 and out["length_ratio"] == 1.0
