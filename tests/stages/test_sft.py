"""Stage 3 (SFT) end to end on the tiny LLaVA: learning, what trains, exact resume, export, context, errors."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rewards.evaluate import evaluate_reports
from rlhf_rrg.config import ConfigError, load_config
from rlhf_rrg.data.dataset import build_dataset
from rlhf_rrg.evaluation import with_context
from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.models.rrg import build_vision_model
from rlhf_rrg.probe import refit_clue_head, tune_clue_thresholds
from rlhf_rrg.prompting.generator import ReportGenerator
from rlhf_rrg.retrieval.context_dataset import ContextDataset
from rlhf_rrg.rl.monitors import text_statistics
from rlhf_rrg.runroot import MissingStageOutputError, WrongStageOutputError

from .conftest import REPO, load_stage, run_stage, stage_overrides

pytestmark = pytest.mark.integration

# Random-init tiny ViT (no align export); context retrieval, clues and self-refine stay on as in debug.yaml.
FAST = [
    "--run.init_from",
    "null",
    "--model.freeze_vision",
    "true",
    "--model.vision",
    "tiny-vit",
    "--train.batch_size",
    "8",
    "--train.log_every",
    "1",
    "--train.eval_every",
    "0",
    "--eval.max_samples",
    "8",
    "--eval.batch_size",
    "8",
    "--eval.max_new_tokens",
    "16",
    "--optim.warmup_steps",
    "2",
]
LLM = ("model.model.language_model.", "model.lm_head.")
VISION = "model.model.vision_tower."


def records(run_root) -> list[dict]:
    return read_jsonl(run_root / "sft" / "metrics.jsonl")


def train_series(run_root, key: str = "train/loss") -> list[float]:
    return [r[key] for r in records(run_root) if key in r]


def checkpoint(run_root, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_root / "sft" / "checkpoints" / f"step_{step:06d}" / "model.safetensors")


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], keys) -> dict[str, bool]:
    return {k: not torch.equal(before[k], after[k]) for k in keys}


@pytest.fixture(scope="module")
def trained(synthetic_data, tmp_path_factory):
    """30 steps without LoRA, stopped after step 1 so its weights are kept next to the final ones."""
    run_root = tmp_path_factory.mktemp("sft_run")
    args = [*FAST, "--train.max_steps", "30", "--optim.lr", "3e-3"]
    run_stage("sft", synthetic_data, run_root, *args, "--train.stop_at_step", "1")
    cfg = run_stage("sft", synthetic_data, run_root, *args)
    return run_root, cfg


def test_loss_falls(trained):
    run_root, _ = trained
    curve = train_series(run_root)
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5
    lm = train_series(run_root, "train/lm_loss")
    assert sum(lm[-5:]) < sum(lm[:5])
    assert (
        len(train_series(run_root, "train/clue_bce")) == 30 and len(train_series(run_root, "train/self_refine")) == 30
    )


def test_memory_bank_quality_is_logged_against_random_retrieval(trained):
    run_root, cfg = trained
    (logged,) = [r for r in records(run_root) if "bank/label_match@5" in r]
    # Random retrieval among the other training studies: the fraction of them with the same positive findings.
    bank_set = build_dataset(cfg.data, "train", train=False)
    positives = [frozenset(k for k, v in s.labels.items() if v == 1) for s in bank_set.studies]
    n = len(positives)
    chance = sum((positives.count(p) - 1) / (n - 1) for p in positives) / n
    assert logged["bank/label_match@5_chance"] == pytest.approx(chance)
    assert 0 <= logged["bank/label_match@5"] <= 1


def test_a_resume_does_not_log_the_step_zero_evaluations_again(trained):
    run_root, _ = trained  # stopped after step 1, then resumed
    for prefix in ("bank/", "baseline_majority/"):
        keys = [k for r in records(run_root) for k in r if k.startswith(prefix)]
        assert keys and len(keys) == len(set(keys)), (prefix, keys)


def test_without_lora_the_llm_trains_and_the_frozen_encoder_does_not(trained):
    run_root, _ = trained
    first, last = checkpoint(run_root, 1), checkpoint(run_root, 30)
    llm = [k for k in first if k.startswith(LLM)]
    vision = [k for k in first if k.startswith(VISION)]
    assert llm and vision
    assert all(changed(first, last, llm).values()), [k for k, v in changed(first, last, llm).items() if not v]
    assert not any(changed(first, last, vision).values())
    trained_heads = [k for k in first if "multi_modal_projector" in k or k.startswith("clue_head.")]
    assert all(changed(first, last, trained_heads).values())


def test_export_reproduces_the_logged_evaluation(trained):
    run_root, cfg = trained
    export = run_root / "sft" / "export"
    assert json.loads((export / "export_complete.json").read_text())["stage"] == "sft"
    generator = ReportGenerator.from_export(export)
    # The exported weights are the final (only evaluated) ones.
    final = checkpoint(run_root, 30)
    torch.testing.assert_close(generator.model.lm_head.weight, final["model.lm_head.weight"])
    # debug.yaml tunes the clue thresholds on the whole val split before evaluating; the export keeps them.
    kept = generator.prompting.clues.thresholds
    assert kept is not None and kept == tune_clue_thresholds(generator, build_dataset(cfg.data, "val", train=False))
    assert_reproduces_the_logged_evaluation(generator, cfg, run_root)


@pytest.mark.parametrize("refit", [True, False])
def test_the_export_keeps_the_clue_head_refit_before_its_evaluation(synthetic_data, tmp_path, refit):
    cfg = run_stage("sft", synthetic_data, tmp_path, *FAST, "--prompting.clues.refit", str(refit).lower(),
                    "--train.max_steps", "2")
    generator = ReportGenerator.from_export(tmp_path / "sft" / "export").eval()
    before = {k: v.clone() for k, v in generator.clue_head.state_dict().items()}
    refit_clue_head(generator, build_dataset(cfg.data, "train", train=False))
    after = generator.clue_head.state_dict()
    # Refit at the only evaluation, then exported: refitting the export's head again finds it already fit. Without
    # the setting the head is SFT's own, which a refit changes.
    assert all(torch.allclose(before[k], after[k], atol=1e-5) for k in before) is refit


def test_tuned_thresholds_are_inert_without_clues(synthetic_data, tmp_path):
    cfg = run_stage("sft", synthetic_data, tmp_path, *FAST, "--prompting.clues.enabled", "false",
                    "--prompting.clues.tune_thresholds", "true", "--train.max_steps", "1")
    assert cfg.prompting.clues.tune_thresholds and not cfg.prompting.clues.enabled
    assert ReportGenerator.from_export(tmp_path / "sft" / "export").clue_head is None


def test_with_a_trained_encoder_the_export_retrieves_and_scores_as_training_did(synthetic_data, tmp_path):
    cfg = run_stage("sft", synthetic_data, tmp_path, *FAST, "--model.freeze_vision", "false", "--train.max_steps",
                    "6", "--optim.lr", "3e-3", "--eval.max_samples", "16")
    generator = ReportGenerator.from_export(tmp_path / "sft" / "export")
    val = build_dataset(cfg.data, cfg.eval.split, train=False)
    kept = with_context(generator, val, exclude_self=False).neighbours
    generator.retriever.encoder = None  # what the tuned tower would retrieve: the case that matters here
    tuned = with_context(generator, val, exclude_self=False).neighbours
    assert not torch.equal(torch.cat(kept, 1), torch.cat(tuned, 1))
    generator = ReportGenerator.from_export(tmp_path / "sft" / "export")
    assert_reproduces_the_logged_evaluation(generator, cfg, tmp_path)


def assert_reproduces_the_logged_evaluation(generator, cfg, run_root):
    """The export's greedy reports for the evaluated val studies score exactly what the stage logged last."""
    val = build_dataset(cfg.data, cfg.eval.split, train=False)
    n = cfg.eval.max_samples
    pixels = torch.stack([val[i]["pixel_values"] for i in range(n)])
    predictions = generator.generate(pixels, [s.id for s in val.studies[:n]], max_new_tokens=cfg.eval.max_new_tokens)
    scores = evaluate_reports(predictions, [val.report(i) for i in range(n)], cfg.eval.metrics)["scores"]
    logged = [r for r in records(run_root) if "eval/bleu_4" in r][-1]
    assert logged["step"] == cfg.train.max_steps
    stats = text_statistics(predictions, [val.report(i) for i in range(n)])
    assert {f"eval/{k}": v for k, v in {**scores, **stats}.items()} == {
        k: v for k, v in logged.items() if k.startswith("eval/")}


def test_with_lora_only_adapters_projector_and_clue_head_train(synthetic_data, tmp_path):
    run_stage(
        "sft",
        synthetic_data,
        tmp_path,
        *FAST,
        "--train.max_steps",
        "3",
        "--model.lora.enabled",
        "true",
        "--checkpoint.save_every",
        "1",
        "--checkpoint.keep",
        "3",
        "--eval.max_samples",
        "2",
    )
    first, last = checkpoint(tmp_path, 1), checkpoint(tmp_path, 3)
    lora = [k for k in first if "lora_" in k]
    projector = [k for k in first if "multi_modal_projector" in k and "modules_to_save" in k]
    frozen = [k for k in first if k not in lora and k not in projector and not k.startswith("clue_head.")]
    assert lora and projector
    assert any(VISION.removeprefix("model.") in k for k in frozen)
    assert any("language_model" in k and "base_layer" in k for k in frozen)
    assert all(changed(first, last, lora).values())
    assert all(changed(first, last, projector).values())
    assert all(changed(first, last, [k for k in first if k.startswith("clue_head.")]).values())
    assert not any(changed(first, last, frozen).values()), [k for k, v in changed(first, last, frozen).items() if v]
    # The export is the merged model: loadable without PEFT, with the adapter kept beside it.
    assert (tmp_path / "sft" / "export" / "adapter" / "adapter_config.json").is_file()
    ReportGenerator.from_export(tmp_path / "sft" / "export")


def test_resume_with_context_and_clues_equals_a_straight_run(synthetic_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # 96 studies / 16 per batch = 6 batches per epoch: the resumed part crosses an epoch boundary.
    args = [*FAST, "--train.max_steps", "8", "--train.batch_size", "16", "--eval.max_samples", "2"]
    run_stage("sft", synthetic_data, straight, *args)
    run_stage("sft", synthetic_data, resumed, *args, "--train.stop_at_step", "4")
    run_stage("sft", synthetic_data, resumed, *args)
    for key in ("train/loss", "train/lm_loss", "train/clue_bce", "train/self_refine"):
        assert len(train_series(straight, key)) == 8
        torch.testing.assert_close(train_series(resumed, key), train_series(straight, key), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["retrieved", "fixed"])
def test_context_neighbours(synthetic_data, tmp_path, mode):
    module = load_stage("sft")
    cfg = load_config(
        module.SFTStageConfig,
        REPO / "stages" / "configs" / "sft" / "debug.yaml",
        stage_overrides(
            synthetic_data, tmp_path, *FAST, "--prompting.context.mode", mode, "--prompting.context.k_pos", "2"
        ),
    )
    bank_set = build_dataset(cfg.data, "train", train=False)
    val_set = build_dataset(cfg.data, "val", train=False)
    vision = build_vision_model("tiny-vit").eval()
    retriever, neighbours = module.build_retriever(cfg, vision, ContextDataset(bank_set), ContextDataset(val_set))
    assert retriever.bank.ids == [s.id for s in bank_set.studies]
    (train_pos, train_neg), (val_pos, val_neg) = neighbours["train"], neighbours["val"]
    assert train_pos.shape == (len(bank_set), 2) and train_neg.shape == (len(bank_set), 1)
    assert val_pos.shape == (len(val_set), 2)
    rows = torch.cat([train_pos, train_neg], 1)
    if mode == "fixed":
        # R2GenCSR's released setting: one draw shared by every study (the drawn studies included).
        assert (rows == rows[0]).all() and (torch.cat([val_pos, val_neg], 1) == rows[0]).all()
    else:
        assert not (rows == torch.arange(len(bank_set))[:, None]).any()
        assert len({tuple(r) for r in rows.tolist()}) > 1


def write_unlabeled(synthetic_data, tmp_path):
    """The synthetic annotation without CheXpert labels, like R2Gen's MIMIC-CXR json."""
    annotation = json.loads((synthetic_data / "annotation.json").read_text())
    for records_ in annotation.values():
        for record in records_:
            record.pop("labels")
    unlabeled = tmp_path / "annotation.json"
    unlabeled.write_text(json.dumps(annotation))
    return unlabeled


def test_retrieval_on_unlabeled_data_labels_the_bank_from_reports(synthetic_data, tmp_path):
    unlabeled = write_unlabeled(synthetic_data, tmp_path)
    run_stage("sft", synthetic_data, tmp_path, *FAST, "--train.max_steps", "1", "--data.annotation_path",
              str(unlabeled), "--prompting.clues.enabled", "false")
    bank = ReportGenerator.from_export(tmp_path / "sft" / "export").retriever.bank
    # The rule labeler's normal/abnormal split of the reports matches the synthetic ground truth for most studies.
    truth = json.loads((synthetic_data / "annotation.json").read_text())["train"]
    normal = torch.tensor([r["labels"].get("No Finding", 0) == 1 for r in truth])
    assert (bank.is_normal == normal).float().mean() > 0.9


def test_clues_without_labels_raise(synthetic_data, tmp_path):
    unlabeled = write_unlabeled(synthetic_data, tmp_path)
    with pytest.raises(ValueError, match="clues.enabled needs CheXpert labels"):
        run_stage(
            "sft",
            synthetic_data,
            tmp_path,
            *FAST,
            "--train.max_steps",
            "1",
            "--data.annotation_path",
            str(unlabeled),
            "--prompting.context.mode",
            "none",
        )


def test_prompting_views_must_equal_data_views(synthetic_data, tmp_path):
    with pytest.raises(ConfigError, match=r"prompting\.views=2.*data\.views=1"):
        run_stage("sft", synthetic_data, tmp_path, *FAST, "--prompting.views", "2")


def test_missing_align_export_is_named(synthetic_data, tmp_path):
    with pytest.raises(MissingStageOutputError, match="'align' export"):
        run_stage("sft", synthetic_data, tmp_path, "--train.max_steps", "1")


@pytest.mark.parametrize("dataset", ["mimic_cxr", "chexpert_plus"])
def test_credentialed_reports_in_the_bank_need_an_opt_in(dataset):
    module = load_stage("sft")
    config = REPO / "stages" / "configs" / "sft" / f"{dataset}.yaml"
    asks = ["--model.llm", "tiny", "--prompting.context.use_reports", "true"]
    with pytest.raises(ConfigError, match="credentialed data: set prompting.context.share_reports: true"):
        load_config(module.SFTStageConfig, config, asks)
    cfg = load_config(module.SFTStageConfig, config, [*asks, "--prompting.context.share_reports", "true"])
    assert cfg.prompting.context.use_reports and cfg.prompting.context.share_reports


def test_skip_drops_a_corrupt_and_a_bomb_training_image_with_retrieval_on(synthetic_data, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    train = json.loads((data / "annotation.json").read_text())["train"]
    corrupt, bomb = (data / "images" / train[i]["image_path"][0] for i in (3, 5))
    corrupt.write_bytes(corrupt.read_bytes()[:60])
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")
    run_stage("sft", data, tmp_path / "run", *FAST, "--train.max_steps", "2", "--data.on_error", "skip")
    ids = ReportGenerator.from_export(tmp_path / "run" / "sft" / "export").retriever.bank.ids
    assert len(ids) == len(set(ids)) == len(train) - 2
    assert train[3]["id"] not in ids and train[5]["id"] not in ids
    assert f"{corrupt}: cannot decode image" in caplog.text
    assert f"{bomb}: refused as a possible decompression bomb" in caplog.text


@pytest.mark.parametrize("stage", ["sft", "align"])
def test_starting_from_an_sft_export_is_a_clear_error(trained, synthetic_data, tmp_path, stage):
    run_root, _ = trained
    with pytest.raises(WrongStageOutputError, match=rf"stage '{stage}'.*is a report-generator export; {stage} starts "
                                                    "from a vision encoder"):
        run_stage(stage, synthetic_data, tmp_path, "--run.init_from", str(run_root / "sft" / "export"))


def test_vocab_min_freq_drops_rare_report_words_but_keeps_every_prompt_word(tmp_path):
    module = load_stage("sft")
    cfg = load_config(module.SFTStageConfig, REPO / "stages/configs/sft/debug.yaml", ["--model.vocab_min_freq", "2"])
    reports = ["the heart is large .", "the heart is small .", "a calcified xxxx granuloma ."]
    tokenizer = module.build_tokenizer(cfg, reports, tmp_path / "tokenizer")
    vocab = tokenizer.get_vocab()
    assert {"the", "heart", "is", "."} <= set(vocab) and not {"large", "granuloma", "xxxx"} & set(vocab)
    # Every word the prompt builder writes keeps its own id.
    for word in ("findings", "suggest", "enlarged", "cardiomegaly", "pneumothorax", "comprehensive", "disease"):
        assert word in vocab, word
