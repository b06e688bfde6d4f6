"""The rule labeler against hand labels: ``data/labeler_eval.jsonl`` (sentences and short reports written in
MIMIC-CXR / IU-Xray style, labelled with CheXpert conventions: 1 positive, 0 negative, -1 uncertain, absent =
not mentioned; "No Finding" is 1 or absent). Each row also names the group of cases it belongs to.
"""

import json
from pathlib import Path

import pytest

from rewards.labeler import label_report
from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE, UNCERTAIN

EVAL_SET = Path(__file__).parent / "data" / "labeler_eval.jsonl"
# CheXbert / labeler codes -> CheXpert values (None = not mentioned).
TO_CHEXPERT = {BLANK: None, POSITIVE: 1, NEGATIVE: 0, UNCERTAIN: -1}
MIN_POSITIVE_F1 = 0.97
MIN_MENTIONED_ACCURACY = 0.95


def load_eval_set() -> list[dict]:
    rows = [json.loads(line) for line in EVAL_SET.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, row in enumerate(rows, start=1):
        unknown = set(row["labels"]) - set(CHEXPERT_14)
        assert not unknown and set(row["labels"].values()) <= {1, 0, -1}, f"{EVAL_SET}:{i}: bad labels {row}"
    return rows


def score(rows: list[dict]) -> tuple[dict[str, dict[str, float]], float, float, list[str]]:
    """Per-observation accuracy on mentioned cells, overall positive F1 and mentioned-cell accuracy, errors."""
    per_obs = {obs: {"correct": 0, "mentioned": 0} for obs in CHEXPERT_14}
    tp = fp = fn = 0
    errors = []
    for row in rows:
        predicted = dict(zip(CHEXPERT_14, (TO_CHEXPERT[c] for c in label_report(row["text"])), strict=True))
        for obs in CHEXPERT_14:
            gold, pred = row["labels"].get(obs), predicted[obs]
            tp += gold == 1 and pred == 1
            fp += gold != 1 and pred == 1
            fn += gold == 1 and pred != 1
            if gold is not None:
                per_obs[obs]["mentioned"] += 1
                per_obs[obs]["correct"] += gold == pred
            if gold != pred:
                errors.append(f"{obs}: gold {gold} pred {pred} in {row['text']!r}")
    f1 = 2 * tp / (2 * tp + fp + fn)
    correct = sum(v["correct"] for v in per_obs.values())
    mentioned = sum(v["mentioned"] for v in per_obs.values())
    table = {
        obs: {"accuracy": v["correct"] / max(v["mentioned"], 1), "mentioned": v["mentioned"]}
        for obs, v in per_obs.items()
    }
    return table, f1, correct / mentioned, errors


def test_eval_set_covers_every_observation_and_class():
    rows = load_eval_set()
    assert len(rows) >= 400
    assert len({row["text"] for row in rows}) == len(rows)
    for obs in CHEXPERT_14:
        values = {row["labels"][obs] for row in rows if obs in row["labels"]}
        assert values == ({1} if obs == "No Finding" else {1, 0, -1}), (obs, values)


def test_rule_labeler_meets_accuracy_targets():
    table, f1, accuracy, errors = score(load_eval_set())
    report = "\n".join(f"{obs:<28}{v['accuracy']:.3f} of {v['mentioned']}" for obs, v in table.items())
    print(f"\nper-observation accuracy on mentioned cells\n{report}\npositive F1 {f1:.3f}, accuracy {accuracy:.3f}")
    detail = f"positive F1 {f1:.3f}, mentioned accuracy {accuracy:.3f}\n{report}\n" + "\n".join(errors)
    assert f1 >= MIN_POSITIVE_F1, detail
    assert accuracy >= MIN_MENTIONED_ACCURACY, detail


@pytest.mark.parametrize(
    ("text", "wrong"),
    [("No effusion.", {"Pleural Effusion": 1}), ("Mild cardiomegaly.", {"Cardiomegaly": 0})],
)
def test_score_counts_errors(text, wrong):
    """The harness itself can fail: a wrong gold label lowers the scores."""
    table, f1, accuracy, errors = score([{"text": text, "labels": wrong}])
    assert accuracy == 0.0 and errors
