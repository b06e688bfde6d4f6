import pytest
import torch
from torch.utils.data import Subset

from rewards.evaluate import evaluate_reports
from rewards.observations import CHEXPERT_14
from rlhf_rrg.data.dataset import DataConfig, build_dataset
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.evaluation import EvalConfig, eval_subset, generate_and_score, majority_report_scores
from rlhf_rrg.prompting.generator import PromptingConfig, ReportGenerator
from rlhf_rrg.retrieval.context_dataset import ContextDataset, collate_context
from rlhf_rrg.testing.tiny_models import tiny_rrg

METRICS = ["bleu", "rouge_l", "ce"]


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, SyntheticConfig(n_train=2, n_val=5, n_test=0, image_size=64, seed=4))
    cfg = DataConfig(annotation_path=root / "annotation.json", image_root=root / "images", image_size=64)
    return ContextDataset(build_dataset(cfg, "val", train=False))


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path_factory.mktemp("tiny"))
    return ReportGenerator(tiny.model, tiny.processor, PromptingConfig())


def test_generate_and_score_scores_what_it_generated(generator, val_set):
    generator.train()
    cfg = EvalConfig(batch_size=2, max_new_tokens=8, metrics=METRICS)
    scores, rows = generate_and_score(generator, val_set, cfg)
    assert generator.training  # restored after evaluating in eval mode
    assert [r["id"] for r in rows] == [val_set[i]["id"] for i in range(len(val_set))]
    assert [r["reference"] for r in rows] == [val_set.base.report(i) for i in range(len(val_set))]
    generator.eval()
    # Batches of 2 (ragged last batch) give the reports of one batch of everything.
    whole = generator.generate_batch(collate_context([val_set[i] for i in range(len(val_set))]), 8)
    assert [r["prediction"] for r in rows] == whole
    expected = evaluate_reports(whole, [r["reference"] for r in rows], METRICS)["scores"]
    assert scores == expected
    assert {"bleu_4", "rouge_l", "ce/micro_f1_14"} <= set(scores)


def test_generate_and_score_states_each_studys_told_clues(generator, val_set, monkeypatch):
    told = torch.rand(len(val_set), len(CHEXPERT_14)) < 0.5
    stated, generate = [], generator.generate_batch
    monkeypatch.setattr(generator, "generate_batch",
                        lambda batch, *args, clues=None: stated.append(clues) or generate(batch, *args, clues=clues))
    cfg = EvalConfig(batch_size=2, max_new_tokens=8, metrics=METRICS)
    _, rows = generate_and_score(generator, val_set, cfg, told)
    assert len(stated) == 3 and torch.equal(torch.cat(stated), told)  # batches of 2, 2, 1 in dataset order
    told_reports = generator.generate_batch(collate_context([val_set[i] for i in range(len(val_set))]), 8, clues=told)
    assert [r["prediction"] for r in rows] == told_reports
    with pytest.raises(ValueError, match=r"clues must have shape \(5, 14\)"):
        generate_and_score(generator, val_set, cfg, told[:4])


def test_eval_subset_keeps_the_first_studies(val_set):
    subset = eval_subset(val_set, EvalConfig(max_samples=3))
    assert isinstance(subset, Subset) and list(subset.indices) == [0, 1, 2]
    assert eval_subset(val_set, EvalConfig(max_samples=0)) is val_set
    assert len(eval_subset(val_set, EvalConfig(max_samples=50))) == len(val_set)


def test_majority_report_scores_use_the_most_common_training_report():
    common = "the heart is normal in size . the lungs are clear ."
    rare = "mild cardiomegaly . small left pleural effusion ."
    train = [rare, common, "a nodule is seen in the right upper lobe .", common, rare, common]
    references = [common, rare, "right lower lobe consolidation ."]
    scores = majority_report_scores(train, references, METRICS)
    assert scores == evaluate_reports([common] * 3, references, METRICS)["scores"]
    assert scores != evaluate_reports([rare] * 3, references, METRICS)["scores"]
    assert majority_report_scores(train, [common], ["rouge_l"])["rouge_l"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metrics": ["bleu", "blue"]}, r"eval.metrics: unknown \['blue'\]"),
        ({"max_samples": -1}, "eval.max_samples"),
        ({"num_beams": 0}, "num_beams"),
    ],
)
def test_eval_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**kwargs)
