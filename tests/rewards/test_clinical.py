import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

from rewards.clinical import CheXpertF1Reward, binarize, build_labeler, ce_metrics
from rewards.labeler import RuleLabeler
from rewards.observations import CHEXPERT_5, CHEXPERT_14, PATHOLOGIES_13


def _random_labels(seed: int, n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (n, 14), generator=g)


@pytest.mark.parametrize("policy", ["negative", "positive"])
def test_ce_metrics_equal_sklearn(policy):
    pred, ref = _random_labels(0), _random_labels(1)
    pred[:, 3] = 0  # a never-predicted column exercises zero_division
    got = ce_metrics(pred, ref, uncertain_policy=policy)
    positive = {1, 3} if policy == "positive" else {1}
    y_pred = np.isin(pred.numpy(), list(positive)).astype(int)
    y_true = np.isin(ref.numpy(), list(positive)).astype(int)
    for suffix, observations in (("14", CHEXPERT_14), ("13", PATHOLOGIES_13), ("5", CHEXPERT_5)):
        cols = [CHEXPERT_14.index(o) for o in observations]
        for average in ("micro", "macro"):
            p, r, f, _ = precision_recall_fscore_support(
                y_true[:, cols], y_pred[:, cols], average=average, zero_division=0
            )
            assert got.scores[f"{average}_precision_{suffix}"] == pytest.approx(p, abs=1e-12)
            assert got.scores[f"{average}_recall_{suffix}"] == pytest.approx(r, abs=1e-12)
            assert got.scores[f"{average}_f1_{suffix}"] == pytest.approx(f, abs=1e-12)
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    for i, obs in enumerate(CHEXPERT_14):
        row = got.per_observation[obs]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (p[i], r[i], f[i], support[i])
        )
    assert "Cardiomegaly" in got.table()


def test_ce_metrics_hand_computed():
    pred = torch.zeros(2, 14, dtype=torch.long)
    ref = torch.zeros(2, 14, dtype=torch.long)
    card, eff = CHEXPERT_14.index("Cardiomegaly"), CHEXPERT_14.index("Pleural Effusion")
    pred[0, card] = 1  # TP
    ref[0, card] = 1
    pred[1, eff] = 1  # FP
    ref[1, card] = 3  # FN only if uncertain counts as positive
    neg = ce_metrics(pred, ref, "negative").scores
    assert (neg["micro_precision_14"], neg["micro_recall_14"], neg["micro_f1_14"]) == pytest.approx((0.5, 1.0, 2 / 3))
    pos = ce_metrics(pred, ref, "positive").scores
    assert (pos["micro_precision_14"], pos["micro_recall_14"], pos["micro_f1_14"]) == pytest.approx((0.5, 0.5, 0.5))


def test_a_normal_report_for_everyone_scores_on_micro_14_but_not_on_the_pathologies():
    """8 normal studies and 2 with cardiomegaly; the writer says "normal" for all 10."""
    card, normal = CHEXPERT_14.index("Cardiomegaly"), CHEXPERT_14.index("No Finding")
    ref = torch.zeros(10, 14, dtype=torch.long)
    ref[:8, normal] = 1
    ref[8:, card] = 1
    pred = torch.zeros(10, 14, dtype=torch.long)
    pred[:, normal] = 1
    scores = ce_metrics(pred, ref).scores
    # micro-14: TP 8, FP 2, FN 2 -> 0.8; the 13 pathologies: no TP -> 0; macro-14: only No Finding's 8/9 over 14.
    assert scores["micro_f1_14"] == pytest.approx(0.8)
    assert scores["micro_f1_13"] == 0.0
    assert scores["macro_f1_14"] == pytest.approx((2 * 0.8 * 1.0 / 1.8) / 14)
    pred[8:, card], pred[8:, normal] = 1, 0
    assert ce_metrics(pred, ref).scores["micro_f1_13"] == 1.0


def test_ce_metrics_rejects_bad_shapes_and_policy():
    with pytest.raises(ValueError, match=r"\(n, 14\)"):
        ce_metrics(torch.zeros(3, 13, dtype=torch.long), torch.zeros(3, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="uncertain_policy"):
        binarize(torch.zeros(1, 14, dtype=torch.long), "ignore")
    with pytest.raises(ValueError, match="labeler must be one of"):
        build_labeler("gpt")


def test_build_labeler_rule_and_missing_chexbert(monkeypatch, tmp_path):
    assert isinstance(build_labeler("rule"), RuleLabeler)
    pytest.importorskip("rewards.chexbert")
    from rewards.weights import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError):
        build_labeler("chexbert", path=str(tmp_path / "missing.pth"))


def test_chexpert_f1_reward_hand_computed():
    reward = CheXpertF1Reward()
    refs = [
        "Mild cardiomegaly. Small right pleural effusion. No pneumothorax.",
        "Mild cardiomegaly. Small right pleural effusion. No pneumothorax.",
        "Heart size is normal. No effusion.",
        "Mild cardiomegaly.",
    ]
    hyps = [
        "Mild cardiomegaly. No effusion.",  # {Card} vs {Card, Eff}: 2*1/(1+2)
        "Cardiomegaly with pleural effusion.",  # exact
        "The heart is normal. No effusion.",  # {No Finding} vs {No Finding}
        "",  # empty -> worst
    ]
    out = reward.score(hyps, refs)
    assert out.scores == pytest.approx([2 / 3, 1.0, 1.0, 0.0])
    assert reward.name == "chexpert_f1"


def test_chexpert_f1_reward_negatives_variant_and_cache():
    reward = CheXpertF1Reward(reward_negatives=True, observations=("Pneumothorax", "Pleural Effusion"))
    ref = "Small right pleural effusion. No pneumothorax."
    # hyp: {Eff+}, ref: {Eff+, Ptx-} -> 2*1/(1+2); stating the negative too gives a full match.
    out = reward.score(["Small effusion.", "Effusion, no pneumothorax.", "Effusion, no pneumothorax."], [ref] * 3)
    assert out.scores == pytest.approx([2 / 3, 1.0, 1.0])
    assert reward._ref_labels.misses == 1 and reward._ref_labels.hits == 2
    assert reward.name == "chexpert_f1_pos_neg"


def test_chexpert_f1_reward_validates_arguments():
    with pytest.raises(ValueError, match="observations"):
        CheXpertF1Reward(observations=("Cardiomegaly", "Heart Attack"))
    with pytest.raises(ValueError, match="labeler"):
        CheXpertF1Reward(labeler="bert")
