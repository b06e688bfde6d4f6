import logging

import pytest

from rewards import build_reward
from rewards.form import DistinctSentenceReward, LengthMatchReward, sentences
from rlhf_rrg.rl.monitors import (
    HackingMonitor,
    MonitorConfig,
    distinct_n,
    has_repeated_sentence,
    text_statistics,
)

HACKED = "no focal consolidation . " * 12


def test_sentences_normalise_and_drop_empty():
    assert sentences("No  effusion. . The heart is normal ;") == ["no effusion", "the heart is normal"]


def test_distinct_n_hand_computed():
    # bigrams: (a b) (b a) (a b) | (c d) -> 3 distinct of 4
    assert distinct_n(["a b a b", "c d"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["a"], 2) == 0.0


def test_repeated_sentence_detects_the_negation_hack():
    assert has_repeated_sentence(HACKED)
    assert not has_repeated_sentence("no focal consolidation . no pneumothorax .")


def test_text_statistics_separate_degenerate_from_varied_batches():
    refs = ["the heart is enlarged . no pleural effusion .", "small left pleural effusion . no pneumothorax ."]
    varied = text_statistics(refs, refs)
    hacked = text_statistics([HACKED, HACKED], refs)
    assert varied["repeated_sentence_rate"] == 0 and hacked["repeated_sentence_rate"] == 1
    assert hacked["distinct_2"] < varied["distinct_2"] and hacked["unique_reports"] == 0.5
    assert varied["length_ratio"] == pytest.approx(1.0) and hacked["length_ratio"] > 3


def _eval(reward, f1, text_stats):
    return {"reward": reward, "ce/micro_f1_14": f1, **text_stats}


def test_monitor_flags_reward_up_while_heldout_f1_falls(caplog):
    refs = ["the heart is enlarged . no pleural effusion ."] * 4
    monitor = HackingMonitor(MonitorConfig())
    healthy = monitor.check(0, _eval(0.40, 0.49, text_statistics(refs, refs)))
    assert healthy["monitor/reward_up_metric_down"] == 0 and healthy["monitor/repetition"] == 0
    with caplog.at_level(logging.WARNING):
        flags = monitor.check(80, _eval(0.57, 0.45, text_statistics([HACKED] * 4, refs)))
    assert flags["monitor/reward_up_metric_down"] == 1
    assert flags["monitor/repetition"] == 1 and flags["monitor/length"] == 1
    assert flags["monitor/reward_metric_gap"] == pytest.approx((0.57 - 0.40) - (0.45 - 0.49))
    assert "gaming its reward" in caplog.text


def test_monitor_quiet_when_reward_and_metric_rise_together():
    monitor = HackingMonitor(MonitorConfig())
    monitor.check(0, _eval(0.40, 0.49, {}))
    assert monitor.check(10, _eval(0.50, 0.55, {}))["monitor/reward_up_metric_down"] == 0


def test_monitor_state_round_trip():
    monitor = HackingMonitor(MonitorConfig())
    monitor.check(0, _eval(0.4, 0.5, {}))
    restored = HackingMonitor(MonitorConfig())
    restored.load_state_dict(monitor.state_dict())
    assert restored.check(1, _eval(0.5, 0.4, {}))["monitor/reward_up_metric_down"] == 1


def test_monitor_config_validation():
    with pytest.raises(ValueError):
        MonitorConfig(length_ratio_range=(1.3, 0.7))


def test_distinct_sentence_reward_makes_repetition_cost():
    out = DistinctSentenceReward().score([HACKED, "no focal consolidation . no pneumothorax .", ""], ["x"] * 3)
    assert out.scores == [pytest.approx(1 / 12), 1.0, 0.0]


def test_length_match_reward_pays_most_at_the_reference_length():
    refs = ["the heart is normal . the lungs are clear ."] * 4  # 10 words
    hyps = ["the heart is normal . the lungs are clear .", "the heart is normal .", "", " ".join(["word"] * 20)]
    out = build_reward("length_match").score(hyps, refs)
    assert out.scores == [1.0, pytest.approx(0.5), 0.0, pytest.approx(0.5)]
    assert isinstance(build_reward("length_match"), LengthMatchReward)
