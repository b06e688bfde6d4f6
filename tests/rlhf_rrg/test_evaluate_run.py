"""Tests for rlhf_rrg.evaluate_run on a tiny run root with a scripted generator in place of the exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from rewards.nlg import corpus_nlg_scores
from rewards.observations import NEGATIVE, POSITIVE
from rlhf_rrg import evaluate_run as ev
from rlhf_rrg.runroot import EXPORT_MARKER

TRAIN = ["No acute disease.", "Mild cardiomegaly. No pleural effusion.", "No acute disease.", "The lungs are clear."]
TEST = {
    "t0": "Mild cardiomegaly. No pleural effusion.",
    "t1": "The lungs are clear. No pneumothorax.",
    "t2": "Small left pleural effusion.",
}
# The sft "model": exact on t0, hallucinates an effusion on t1, misses the effusion on t2.
SFT = {
    "t0": "mild cardiomegaly . no pleural effusion .",
    "t1": "the lungs are clear . large right pleural effusion .",
    "t2": "no acute disease .",
}


class ScriptedGenerator:
    """Answers each study id with a fixed report and checks the pixels it is given."""

    views, image_size = 2, 16
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def generate(
        self, pixel_values: torch.Tensor, ids: list[str] | None = None, max_new_tokens: int = 100, num_beams: int = 1
    ) -> list[str]:
        assert pixel_values.shape[1:] == (2, 3, 16, 16) and ids is not None
        return [SFT[i] for i in ids]


def _write_run(root: Path) -> Path:
    data = root / "data"
    annotation: dict[str, list[dict]] = {"val": []}
    for split, reports in (("train", dict(enumerate(TRAIN))), ("test", TEST)):
        annotation[split] = []
        for key, report in reports.items():
            sid = f"{split}_{key}" if split == "train" else str(key)
            for view in (0, 1):
                (data / "images" / sid).mkdir(parents=True, exist_ok=True)
                Image.new("L", (12, 12), 100 + 50 * view).save(data / "images" / sid / f"{view}.png")
            annotation[split].append(
                {"id": sid, "report": report, "image_path": [f"{sid}/0.png", f"{sid}/1.png"], "split": split}
            )
    (data / "annotation.json").write_text(json.dumps(annotation))
    run = root / "run"
    (run / "sft" / "export").mkdir(parents=True)
    (run / "sft" / "export" / EXPORT_MARKER).write_text(json.dumps({"export_id": "sft-1"}))
    data_section = {
        "dataset": "iu_xray",
        "annotation_path": str(data / "annotation.json"),
        "image_root": str(data / "images"),
        "views": 2,
        "image_size": 16,
    }
    (run / "sft" / "config.yaml").write_text(yaml.safe_dump({"run": {"seed": 1}, "data": data_section}))
    return run


@pytest.fixture
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(ev, "load_generator", lambda path, device: ScriptedGenerator())
    return _write_run(tmp_path)


def _rows(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_majority_and_sft_outputs(run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = ev.main(["--run-root", str(run_root), "--batch-size", "2"])

    assert list(results) == ["majority", "sft"]  # ppo has no export: skipped
    assert not (run_root / "eval" / "ppo").exists()
    majority = _rows(run_root / "eval" / "majority" / "predictions.jsonl")
    assert {r["prediction"] for r in majority.values()} == {"no acute disease ."}  # IU cleaner output
    sft = _rows(run_root / "eval" / "sft" / "predictions.jsonl")
    assert list(sft) == ["t0", "t1", "t2"]
    assert sft["t0"]["reference"] == SFT["t0"]
    assert sft["t0"]["images"][1].endswith("t0/1.png")
    assert sft["t0"]["scores"]["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert sft["t0"]["scores"]["chexpert_f1"] == 1.0
    assert (
        sft["t0"]["pred_labels"] == sft["t0"]["ref_labels"] == {"Cardiomegaly": POSITIVE, "Pleural Effusion": NEGATIVE}
    )
    # t1: effusion hallucinated; t2: effusion missed. Neither shares a positive finding with its reference.
    assert (
        sft["t1"]["pred_labels"]["Pleural Effusion"] == POSITIVE and "Pleural Effusion" not in sft["t1"]["ref_labels"]
    )
    assert (
        sft["t2"]["ref_labels"]["Pleural Effusion"] == POSITIVE and "Pleural Effusion" not in sft["t2"]["pred_labels"]
    )
    assert sft["t1"]["scores"]["chexpert_f1"] == sft["t2"]["scores"]["chexpert_f1"] == 0.0

    scores = json.loads((run_root / "eval" / "sft" / "scores.json").read_text())
    refs = [sft[k]["reference"] for k in TEST]
    expected = corpus_nlg_scores([SFT[k] for k in TEST], refs, ["bleu", "rouge_l", "cider"])
    for key, value in expected.items():
        assert scores["scores"][key] == pytest.approx(value)
    # Hand count over the 3 studies: predicted positives {cardiomegaly t0, effusion t1}, reference positives
    # {cardiomegaly t0, no finding t1, effusion t2}; t2's "no acute disease" counts as No Finding too.
    assert scores["scores"]["ce/micro_precision_14"] == pytest.approx(1 / 3)
    assert scores["scores"]["ce/micro_recall_14"] == pytest.approx(1 / 3)
    assert scores["n"] == 3 and scores["split"] == "test" and scores["export"].endswith("sft/export")
    assert scores["export_id"] == "sft-1"  # ties the scores to the export for its model card

    table = (run_root / "eval" / "table.md").read_text()
    assert table == capsys.readouterr().out
    header, _, maj_line, sft_line = table.splitlines()[:4]
    assert header.split("|")[2:-1] == [f" {c} " for c, _ in ev.TABLE_COLUMNS]
    cells = [c.strip() for c in sft_line.split("|")[1:-1]]
    cell = dict(zip(["stage"] + [c for c, _ in ev.TABLE_COLUMNS], cells, strict=True))
    assert cell["stage"] == "sft" and cell["B4"] == f"{expected['bleu_4']:.3f}"
    assert cell["RadGraph"] == ("skip" if "radgraph" in scores["skipped"] else f"{scores['scores']['radgraph']:.3f}")
    # Pathologies only: the predicted {cardiomegaly t0, effusion t1} vs the references' {cardiomegaly t0, effusion t2}.
    assert scores["scores"]["ce/micro_f1_13"] == pytest.approx(0.5)
    assert cell["CE-F1-13"] == "0.500" and cell["CE-mF1"] == f"{scores['scores']['ce/macro_f1_14']:.3f}"
    assert maj_line.startswith("| majority |")
    saved = yaml.safe_load((run_root / "eval" / "data.yaml").read_text())
    assert saved["data"]["views"] == 2 and saved["data"]["dataset"] == "iu_xray"


def test_data_overrides_reach_the_dataset_and_errors_exit(run_root: Path) -> None:
    with pytest.raises(SystemExit, match="takes 2 views per study but data.views=1; pass --data.views 2"):
        ev.main(["--run-root", str(run_root), "--data.views", "1"])
    assert yaml.safe_load((run_root / "eval" / "data.yaml").read_text())["data"]["views"] == 1
    with pytest.raises(SystemExit, match="unknown config key 'data.viewz'"):
        ev.main(["--run-root", str(run_root), "--data.viewz", "1"])
    with pytest.raises(SystemExit, match="not report-generator stages"):
        ev.main(["--run-root", str(run_root), "--stages", "align"])
    with pytest.raises(SystemExit):
        ev.main(["--run-root", str(run_root), "--beams", "3"])


def test_majority_report_prefers_most_frequent_then_first() -> None:
    class Reports:
        def __init__(self, reports: list[str]) -> None:
            self.reports = reports

        def __len__(self) -> int:
            return len(self.reports)

        def report(self, i: int) -> str:
            return self.reports[i]

    assert ev.majority_report(Reports(["a", "b", "b", "c"])) == "b"
    assert ev.majority_report(Reports(["c", "a", "a", "c"])) == "c"


def test_table_names_the_ce_labeler_and_uncertain_policy():
    from rewards.evaluate import evaluate_reports

    result = evaluate_reports(["Pneumonia."], ["Possible pneumonia."], ["ce"], uncertain_policy="both")
    table = ev.format_table({"sft": result})
    assert "CE: rule labeler, uncertain counted as negative (R2Gen) (CheXpert-14 micro)" in table
