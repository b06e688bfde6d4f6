import pytest

from rlhf_rrg.rl.selection import ExportSelector, SelectConfig, is_fluent


def _eval(reward: float, length_ratio: float = 1.0, repeated: float = 0.0) -> dict[str, float]:
    return {"reward": reward, "length_ratio": length_ratio, "repeated_sentence_rate": repeated, "ce/x": reward}


def test_fluency_is_the_length_band_or_the_start_and_no_more_repetition():
    cfg = SelectConfig(length_band=0.15)
    start = _eval(0.0, length_ratio=1.0, repeated=0.1)
    assert is_fluent(_eval(1.0, 0.86, 0.1), start, cfg)
    assert not is_fluent(_eval(1.0, 0.84, 0.1), start, cfg)
    assert not is_fluent(_eval(1.0, 1.16, 0.1), start, cfg)
    assert not is_fluent(_eval(1.0, 1.0, 0.11), start, cfg)
    assert is_fluent(_eval(1.0, 1.0, 0.11), start, SelectConfig(repetition_slack=0.02))
    # A starting policy already 0.7x the references' length allows drift up to 0.3 either way.
    far = _eval(0.0, length_ratio=0.7)
    assert is_fluent(_eval(1.0, 0.71), far, cfg) and is_fluent(_eval(1.0, 1.3), far, cfg)
    assert not is_fluent(_eval(1.0, 0.69), far, cfg)


def test_the_best_fluent_evaluation_is_exported_and_the_start_when_rl_only_degrades():
    selector = ExportSelector(SelectConfig())
    offers = [(0, _eval(0.5)), (10, _eval(0.7, 0.95)), (20, _eval(0.9, 0.6)), (30, _eval(0.6)), (40, _eval(0.8))]
    assert [selector.offer(step, m) for step, m in offers] == [True, True, False, False, True]
    assert selector.best == {"step": 40.0, "score": 0.8}
    degrading = ExportSelector(SelectConfig())
    assert [degrading.offer(s, m) for s, m in [(0, _eval(0.5)), (5, _eval(0.9, 1.5)), (9, _eval(0.4))]] == \
        [True, False, False]
    assert degrading.best["step"] == 0.0


def test_equal_scores_keep_the_earlier_policy_and_the_metric_is_configurable():
    selector = ExportSelector(SelectConfig(metric="ce/x"))
    assert [selector.offer(s, _eval(0.5)) for s in (0, 1)] == [True, False]
    with pytest.raises(KeyError, match="select.metric 'bleu'"):
        ExportSelector(SelectConfig(metric="bleu")).offer(0, _eval(0.5))


def test_state_round_trips_so_a_resumed_run_compares_against_its_export():
    selector = ExportSelector(SelectConfig())
    selector.offer(0, _eval(0.5, 0.8))
    selector.offer(5, _eval(0.7, 0.9))
    resumed = ExportSelector(SelectConfig())
    resumed.load_state_dict(selector.state_dict())
    assert resumed.best == selector.best and resumed.start == selector.start
    assert not resumed.offer(10, _eval(0.6)) and resumed.offer(15, _eval(0.8))


def test_config_validates():
    with pytest.raises(ValueError, match="select.mode"):
        SelectConfig(mode="median")
    with pytest.raises(ValueError, match="length_band"):
        SelectConfig(length_band=-0.1)
