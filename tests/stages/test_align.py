import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from rlhf_rrg.config import ConfigError, load_config
from rlhf_rrg.export.aligner import load_aligner
from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.models.vision import RRGVisionModel
from rlhf_rrg.runroot import EXPORT_MARKER, MissingStageOutputError

from .conftest import REPO, load_stage, run_stage

pytestmark = pytest.mark.integration

SCRATCH = ["--run.init_from", "null", "--train.batch_size", "16", "--train.log_every", "1"]


def records(run_root: Path, key: str) -> list[dict]:
    return [r for r in read_jsonl(run_root / "align" / "metrics.jsonl") if key in r]


def losses(run_root: Path) -> list[float]:
    return [r["train/loss"] for r in records(run_root, "train/loss")]


@pytest.fixture(scope="module")
def memorised_val(synthetic_data, tmp_path_factory) -> Path:
    """The synthetic set with val = 16 training studies: a few dozen CPU steps learn the pairing of seen studies,
    not findings that carry over to new ones, so this is what a short run can be checked on."""
    out = tmp_path_factory.mktemp("memorised")
    annotation = json.loads((synthetic_data / "annotation.json").read_text())
    annotation["val"] = [{**study, "split": "val"} for study in annotation["train"][:16]]
    (out / "annotation.json").write_text(json.dumps(annotation))
    (out / "images").symlink_to(synthetic_data / "images")
    return out


def test_loss_falls_and_recall_beats_chance(memorised_val, tmp_path):
    run_stage("align", memorised_val, tmp_path, *SCRATCH, "--train.max_steps", "48")
    curve = losses(tmp_path)
    assert len(curve) == 48
    assert sum(curve[-6:]) / 6 < 0.88 * sum(curve[:6]) / 6
    (final,) = records(tmp_path, "eval/i2t_recall@5")
    # 16 distinct reports: a random ranking puts the match in the top k with probability k/16.
    assert final["eval/i2t_recall@5"] >= 5 / 16 + 3 / 16 and final["eval/t2i_recall@5"] >= 5 / 16 + 3 / 16
    assert final["eval/i2t_recall@1"] + final["eval/t2i_recall@1"] > 2 / 16
    assert final["eval/i2t_recall@1"] <= final["eval/i2t_recall@5"]
    assert final["eval/recall@5_chance"] == pytest.approx(5 / 16)
    for key in ("i2t_label_match@5", "i2i_label_match@5"):
        assert 0 <= final[f"eval/{key}_chance"] <= 1 and 0 <= final[f"eval/{key}"] <= 1
    assert (tmp_path / "align" / "export" / EXPORT_MARKER).is_file()


def test_from_pretrain_export_trains_what_is_trainable_and_exports(synthetic_data, tmp_path):
    run_stage("pretrain", synthetic_data, tmp_path, "--train.max_steps", "2", "--train.batch_size", "8")
    run_stage("align", synthetic_data, tmp_path, "--train.max_steps", "4", "--train.batch_size", "8",
              "--checkpoint.save_every", "2", "--model.freeze_text", "true")
    export = tmp_path / "align" / "export"
    init_vision = load_file(tmp_path / "pretrain" / "export" / "model.safetensors")
    vision = load_file(export / "vision" / "model.safetensors")
    assert vision.keys() == init_vision.keys()
    changed = [name for name in vision if not torch.equal(vision[name], init_vision[name])]
    assert sorted(changed) == sorted(vision), f"untrained vision tensors: {set(vision) - set(changed)}"
    # The text tower was frozen: its export is the tiny initial encoder, bit for bit.
    init_text = load_file(tmp_path / "align" / "text_init" / "model.safetensors")
    text = load_file(export / "text" / "model.safetensors")
    assert all(torch.equal(text[name], init_text[name]) for name in init_text)
    # The heads and the temperature train at every step.
    step2, step4 = (load_file(tmp_path / "align" / "checkpoints" / f"step_00000{s}" / "model.safetensors")
                    for s in (2, 4))
    for name in ("aligner.image_proj.weight", "aligner.text_proj.weight", "aligner.loss.logit_scale"):
        assert not torch.equal(step2[name], step4[name]), name
    heads = load_file(export / "heads.safetensors")
    torch.testing.assert_close(heads["image_proj.weight"], step4["aligner.image_proj.weight"])

    loaded = AutoModel.from_pretrained(export / "vision")
    assert isinstance(loaded, RRGVisionModel) and loaded.config.encoder_type == "arm"
    aligner, tokenizer = load_aligner(export)
    assert aligner.view_pooling == "first" and aligner.aligner.text_pooling == "mean"
    info = json.loads((export / EXPORT_MARKER).read_text())
    assert info["stage"] == "align" and info["init_from"] == "pretrain"


def test_resume_continues_exactly(synthetic_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    steps = [*SCRATCH, "--train.max_steps", "6", "--train.batch_size", "8"]
    run_stage("align", synthetic_data, straight, *steps)
    run_stage("align", synthetic_data, resumed, *steps, "--train.stop_at_step", "3")
    assert not (resumed / "align" / "export" / EXPORT_MARKER).exists()
    run_stage("align", synthetic_data, resumed, *steps)
    torch.testing.assert_close(losses(resumed), losses(straight), rtol=1e-5, atol=1e-6)
    assert records(resumed, "eval/i2t_recall@5") == records(straight, "eval/i2t_recall@5")


def test_missing_pretrain_export_is_named(synthetic_data, tmp_path):
    with pytest.raises(MissingStageOutputError, match="'pretrain' export"):
        run_stage("align", synthetic_data, tmp_path, "--train.max_steps", "2")


@pytest.mark.parametrize("name", ["debug", "iu_xray", "mimic_cxr", "chexpert_plus"])
def test_configs_load(name):
    module = load_stage("align")
    cfg = load_config(module.AlignStageConfig, REPO / "stages" / "configs" / "align" / f"{name}.yaml")
    assert cfg.train.select_metric in cfg.eval.metric_names
    if name == "debug":
        assert cfg.text.path is None and cfg.data.image_size == 64
    else:
        assert cfg.run.init_from == "pretrain" and cfg.text.path and cfg.data.dataset == name
        assert cfg.train.batch_size >= 32


def test_unknown_select_metric_is_named():
    module = load_stage("align")
    with pytest.raises(ConfigError, match="train.select_metric='i2t_recall@10'"):
        load_config(module.AlignStageConfig, REPO / "stages" / "configs" / "align" / "debug.yaml",
                    ["--train.select_metric", "i2t_recall@10"])
