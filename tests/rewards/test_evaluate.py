import json

import pytest
from pycocoevalcap.bleu.bleu import Bleu

from rewards.cleaning import DEFAULT_MAX_WORDS
from rewards.clinical import ce_metrics
from rewards.evaluate import align, evaluate_reports, format_table, main, prepare_references, read_reports
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
    assert result["n"] == 3 and set(result["ce_per_observation"]) == {"ce"}


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
        evaluate_reports(PREDS, prepare_references(REFS, "mimic_cxr"), ["bleu", "rouge_l", "cider", "ce"])["scores"]
    )
    assert "radcliq" in written["skipped"]
    printed = capsys.readouterr().out
    assert "bleu_4" in printed and "radcliq  " in printed and "skipped" in printed


def test_ce_offers_both_uncertain_policies_and_names_them():
    # Reference "possible pneumonia" is uncertain, the prediction positive: R2Gen's policy (uncertain = negative)
    # has one false positive and no true positive (F1 0); f1chexbert's (uncertain = positive) one true positive (F1 1).
    result = evaluate_reports(["Pneumonia."], ["Possible pneumonia."], ["ce"], uncertain_policy="both")
    assert result["scores"]["ce/micro_f1_14"] == 0.0
    assert result["scores"]["ce_unc_pos/micro_f1_14"] == 1.0
    assert result["ce_protocol"] == {
        "ce": "rule labeler, uncertain counted as negative (R2Gen)",
        "ce_unc_pos": "rule labeler, uncertain counted as positive (f1chexbert)",
    }
    assert "uncertain counted as positive (f1chexbert)" in format_table(result)
    with pytest.raises(ValueError, match="uncertain_policy"):
        evaluate_reports(["a"], ["b"], ["ce"], uncertain_policy="ignore")


def test_references_get_evaluate_runs_cleaning_and_word_cut():
    words = " ".join(f"w{i}" for i in range(200))
    iu = prepare_references({"a": f"Heart normal.\n{words}."}, "iu_xray")["a"]
    assert len(iu.split()) == DEFAULT_MAX_WORDS["iu_xray"] and iu.startswith("heart normal")
    assert len(prepare_references({"a": words}, "mimic_cxr")["a"].split()) == DEFAULT_MAX_WORDS["mimic_cxr"]
    assert prepare_references({"a": words}, "iu_xray", truncate=False) == {"a": words}
    with pytest.raises(ValueError, match="dataset must be one of"):
        prepare_references({"a": words}, "padchest")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'{"id": "s1", "report": "ok"}\n{"id": "s2", "report": null}\n',
            "ref.jsonl:2: 'report' must be a string, got null",
        ),
        (b'{"id": "s1", "report": 3}\n', "ref.jsonl:1: 'report' must be a string, got 3"),
        (b'{"id": null, "report": "x"}\n', "ref.jsonl:1: 'id' must be a string or integer, got null"),
        (b'{"id": "s1", "report": "ok"}\n{"id": "s2", "report": "caf\xe9"}\n', "ref.jsonl:2: not valid UTF-8"),
        (b'{"id": "s1", "report": "ok"\n', "ref.jsonl:1: not valid JSON"),
    ],
)
def test_cli_input_errors_are_one_line_naming_file_and_line(tmp_path, capsys, content, message):
    pred, ref = _write(tmp_path / "pred.jsonl", PREDS), tmp_path / "ref.jsonl"
    ref.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["--pred", str(pred), "--ref", str(ref), "--metrics", "bleu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("rewards.evaluate: error: ") and message in err and str(ref) in err


def test_cli_missing_file_is_named(tmp_path, capsys):
    pred = _write(tmp_path / "pred.jsonl", PREDS)
    with pytest.raises(SystemExit):
        main(["--pred", str(pred), "--ref", str(tmp_path / "nope.jsonl"), "--metrics", "bleu"])
    err = capsys.readouterr().err
    assert "nope.jsonl: cannot read" in err and err.count("\n") == 1


def test_cli_dataset_truncation_flag_and_both_policies(tmp_path, capsys):
    pred, ref = _write(tmp_path / "pred.jsonl", PREDS), _write(tmp_path / "ref.jsonl", REFS)
    args = ["--pred", str(pred), "--ref", str(ref), "--metrics", "bleu,ce", "--dataset", "iu_xray"]
    result = main([*args, "--no-truncate", "--uncertain-policy", "both"])
    expected = evaluate_reports(PREDS, REFS, ["bleu", "ce"], uncertain_policy="both", cleaner="iu_xray")
    assert result["scores"] == pytest.approx(expected["scores"])
    assert {"ce/micro_f1_14", "ce_unc_pos/micro_f1_14"} <= set(result["scores"])
    assert "ce_unc_pos" in capsys.readouterr().out
    cut = main(args)["scores"]
    assert cut == pytest.approx(
        evaluate_reports(PREDS, prepare_references(REFS, "iu_xray"), ["bleu", "ce"], cleaner="iu_xray")["scores"]
    )
