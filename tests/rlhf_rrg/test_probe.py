import pytest
import torch

from rewards.observations import CHEXPERT_14
from rlhf_rrg.probe import best_thresholds, compare, fit_logistic_probe, fit_probe, heldout_fold, probe_probabilities


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column j of the target is positive iff feature j > 0.5 (features uniform in [0, 1]); 2 noise features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 16, generator=g)
    y = x[:, :14] > 0.5
    y[:, 13] = False  # one observation never present: the probe must stay silent on it
    return x, y


def test_probe_recovers_a_linear_rule_and_thresholds_come_from_heldout_data():
    x, y = _separable(400, 0)
    xv, yv = _separable(200, 1)
    xt, yt = _separable(200, 2)
    probe = fit_logistic_probe(x, y, l2=1e-4)
    val_probs = probe_probabilities(xv, probe)
    thresholds = best_thresholds(val_probs, yv)
    assert (val_probs[:, 13] < thresholds[13]).all()  # no positives in val: the column stays silent
    report = compare(yt, {"probe": probe_probabilities(xt, probe) >= thresholds, "silent": torch.zeros_like(yt)})
    assert report.micro["probe"]["f1"] > 0.9
    assert report.micro["silent"]["f1"] == 0.0
    assert report.rows[CHEXPERT_14[0]]["support"] == float(yt[:, 0].sum())
    assert "micro f1" in report.table() and report.to_json()["n"] == 200


def test_best_threshold_hand_computed():
    probs = torch.tensor([[0.9], [0.6], [0.3], [0.2]])
    targets = torch.tensor([[True], [True], [False], [False]])
    # Any threshold in (0.3, 0.6] separates perfectly; ties go to the one nearest 0.5.
    assert best_thresholds(probs, targets).item() == pytest.approx(0.5)
    targets = torch.tensor([[True], [False], [True], [False]])
    # F1 at t <= 0.2: 2*2/(4+2) = 0.667; at t in (0.2, 0.3]: 2*2/(3+2) = 0.8 -> best; above 0.3: 2/(2+2) = 0.5
    assert 0.2 < best_thresholds(probs, targets).item() <= 0.3


def test_compare_matches_ce_micro_f1():
    targets = torch.zeros(2, 14, dtype=torch.bool)
    targets[0, 1] = targets[1, 9] = True
    pred = torch.zeros(2, 14, dtype=torch.bool)
    pred[0, 1] = pred[1, 2] = True  # one TP, one FP, one FN -> P = R = F1 = 0.5
    micro = compare(targets, {"x": pred}).micro["x"]
    # All three are pathologies, so the 13-pathology F1 is the same; macro-14: Cardiomegaly 1, the rest 0.
    assert micro == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "f1_13": 0.5, "macro_f1": 1 / 14})


def test_thresholds_maximise_micro_f1_not_each_columns_own():
    # Column 0 is easy; column 1 is noise with few positives. Its own best F1 comes from predicting every study
    # positive (F1 = 2*2/(2+10) = 0.33), which costs the pooled score 8 false positives; silence is better for micro.
    probs = torch.tensor([[0.9, 0.6]] * 5 + [[0.1, 0.6]] * 5, dtype=torch.float64)
    targets = torch.zeros(10, 2, dtype=torch.bool)
    targets[:5, 0] = True
    targets[[0, 5], 1] = True
    thresholds = best_thresholds(probs, targets)
    assert thresholds[1] > 0.6 and 0.1 < thresholds[0] <= 0.9


def test_without_val_the_thresholds_come_from_a_held_out_part_of_train():
    x, y = _separable(200, 0)
    fit, held = heldout_fold(len(x))
    assert len(held) == 40 and set(fit.tolist()).isdisjoint(held.tolist()) and len(fit) + len(held) == 200
    probe, thresholds = fit_probe(x, y, None, None, l2=1e-4)
    alone = fit_logistic_probe(x[fit], y[fit], l2=1e-4)
    torch.testing.assert_close(probe[2], alone[2])  # fit on the fit rows only
    torch.testing.assert_close(thresholds, best_thresholds(probe_probabilities(x[held], alone), y[held]))
    xv, yv = _separable(100, 1)
    with_val = fit_probe(x, y, xv, yv, l2=1e-4)[1]
    whole = fit_logistic_probe(x, y, l2=1e-4)
    torch.testing.assert_close(with_val, best_thresholds(probe_probabilities(xv, whole), yv))
    with pytest.raises(ValueError, match="at least 2"):
        heldout_fold(1)
