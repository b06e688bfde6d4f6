import json

import pytest
from pycocoevalcap.bleu.bleu import Bleu

from rewards.clinical import ce_metrics
from rewards.evaluate import align, evaluate_reports, main, read_reports
from rewards.labeler import RuleLabeler
from rewards.nlg import r2gen_tokenize

REFS = {
    "s1": "Mild cardiomegaly. Small right pleural effusion.",
    "s2": "Lungs are clear. No pneumothorax.",
    "s3": "Left lower lobe consolidation. No effusion.",
}
PREDS = {
    "s3": "Left lower lobe opacity. No effusion.",
    "s1": "Cardiomegaly. No effusion.",
    "s2": "The lungs are clear.",
}


@pytest.fixture(autouse=True)
def _no_model_weights(monkeypatch, tmp_path):
    for var in ("RRG_CHEXBERT_PATH", "RRG_RADGRAPH_PATH", "RRG_BERTSCORE_MODEL"):
        monkeypatch.setenv(var, str(tmp_path / "missing"))


def _write(path, rows):
    path.write_text("\n".join(json.dumps({"id": k, "report": v}) for k, v in rows.items()) + "\n")
    return path


def test_scores_match_pycoco_and_ce_after_id_alignment():
    result = evaluate_reports(PREDS, REFS, metrics=["bleu", "ce"])
    ids = list(REFS)
    gts = {i: [r2gen_tokenize(REFS[k])] for i, k in enumerate(ids)}
    res = {i: [r2gen_tokenize(PREDS[k])] for i, k in enumerate(ids)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert result["scores"]["bleu_4"] == pytest.approx(bleu[3])
    labeler = RuleLabeler()
    ce = ce_metrics(labeler.label([PREDS[k] for k in ids]), labeler.label([REFS[k] for k in ids]))
    assert result["scores"]["ce/micro_f1_14"] == pytest.approx(ce.scores["micro_f1_14"])
    assert result["n"] == 3 and set(result["ce_per_observation"]) == {"rule"}


def test_missing_weights_and_java_are_skipped_with_reason(monkeypatch):
    monkeypatch.setattr("rewards.evaluate.java_available", lambda: False)
    result = evaluate_reports(PREDS, REFS, metrics=["rouge_l", "meteor", "radcliq", "ce_chexbert", "bertscore"])
    assert set(result["skipped"]) == {"meteor", "radcliq", "ce_chexbert", "bertscore"}
    assert "java" in result["skipped"]["meteor"]
    assert "missing" in result["skipped"]["radcliq"]
    assert "rouge_l" in result["scores"]


def test_mismatched_ids_are_listed():
    with pytest.raises(ValueError, match=r"1 reference ids have no prediction \['s3'\]; 1 prediction ids .*\['s9'\]"):
        align({"s1": "a", "s2": "b", "s9": "c"}, REFS)
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate_reports(PREDS, REFS, metrics=["bleu", "spice"])


def test_read_reports_names_the_bad_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "report": "x"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: each row needs 'id' and 'report'"):
        read_reports(bad)
    bad.write_text('{"id": "a", "report": "x"}\n{"id": "a", "report": "y"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: duplicate id 'a'"):
        read_reports(bad)


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    pred, ref = _write(tmp_path / "pred.jsonl", PREDS), _write(tmp_path / "ref.jsonl", REFS)
    out = tmp_path / "eval" / "scores.json"
    main(["--pred", str(pred), "--ref", str(ref), "--metrics", "bleu,rouge_l,cider,ce,radcliq", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["scores"] == pytest.approx(
        evaluate_reports(PREDS, REFS, ["bleu", "rouge_l", "cider", "ce"])["scores"]
    )
    assert "radcliq" in written["skipped"]
    printed = capsys.readouterr().out
    assert "bleu_4" in printed and "radcliq  " in printed and "skipped" in printed
