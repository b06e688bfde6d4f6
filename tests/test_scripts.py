"""The reproduction scripts: syntax, per-dataset settings, and that missing inputs stop them with exit 2."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rlhf_rrg.models.text_encoder import tiny_text_encoder
from rlhf_rrg.runroot import EXPORT_MARKER
from rlhf_rrg.testing.fixtures import IU_REPORTS, FixturePaths, write_chexpert_plus_fixture, write_iu_xray_fixture
from rlhf_rrg.testing.tiny_llm import write_tiny_llm

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
STEPS = ["01_prepare_data.sh", "02_pretrain.sh", "03_align.sh", "04_sft.sh", "05_ppo.sh", "06_eval.sh"]
ALL = [*STEPS, "reproduce_all.sh"]


def _run(script: str, *args: str, timeout: int = 120, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RRG_") and k != "ACCEL"}
    return subprocess.run(
        ["bash", str(SCRIPTS / script), *args], env={**base, **env}, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("script", [*ALL, "lib/common.sh"])
def test_syntax(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", ALL)
def test_requires_rrg_home_and_a_known_dataset(script: str, tmp_path: Path) -> None:
    result = _run(script, "iu_xray")
    assert result.returncode == 2 and "RRG_HOME is not set" in result.stderr
    result = _run(script, "mimic", RRG_HOME=str(tmp_path))
    assert result.returncode == 2 and "one of: iu_xray mimic_cxr chexpert_plus (got 'mimic')" in result.stderr


@pytest.mark.parametrize("script", ALL)
def test_missing_data_is_named_with_its_source(script: str, tmp_path: Path) -> None:
    result = _run(script, "iu_xray", RRG_HOME=str(tmp_path), RRG_LLM_PATH=str(tmp_path / "llm"),
                  RRG_TEXT_PATH=str(tmp_path / "bert"))
    assert result.returncode == 2, result.stderr
    assert "missing inputs, nothing was started" in result.stderr
    assert f"{tmp_path}/data/iu_xray/annotation.json (download: R2Gen's preprocessed IU-Xray" in result.stderr
    assert "accelerate" not in result.stdout


@pytest.fixture
def rrg_home(tmp_path: Path) -> Path:
    write_iu_xray_fixture(tmp_path / "data")
    return tmp_path


def test_prepare_data_reads_every_split(rrg_home: Path) -> None:
    result = _run("01_prepare_data.sh", "iu_xray", RRG_HOME=str(rrg_home))
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        "iu_xray train",
        "iu_xray val",
        "iu_xray test",
    ]
    assert "iu_xray test: 3 studies" in result.stdout


@pytest.mark.parametrize(
    ("script", "previous", "producer"),
    [
        ("03_align.sh", "pretrain", "02_pretrain.sh"),
        ("05_ppo.sh", "sft", "04_sft.sh"),
        ("06_eval.sh", "sft", "04_sft.sh"),
    ],
)
def test_stage_needs_the_previous_export(script: str, previous: str, producer: str, rrg_home: Path) -> None:
    result = _run(script, "iu_xray", RRG_HOME=str(rrg_home), RRG_TEXT_PATH=str(rrg_home / "bert"))
    assert result.returncode == 2
    export = rrg_home / "runs" / "iu_xray" / previous / "export" / EXPORT_MARKER
    assert f"{export} (run scripts/{producer} iu_xray first)" in result.stderr


def test_sft_needs_the_llm(rrg_home: Path) -> None:
    result = _run("04_sft.sh", "iu_xray", RRG_HOME=str(rrg_home))
    assert result.returncode == 2 and "RRG_LLM_PATH is not set" in result.stderr
    result = _run("04_sft.sh", "iu_xray", RRG_HOME=str(rrg_home), RRG_LLM_PATH=str(rrg_home / "qwen"))
    assert result.returncode == 2 and f"{rrg_home}/qwen/config.json (the qwen2.5-1.5b checkpoint" in result.stderr


def test_align_needs_the_text_encoder(rrg_home: Path) -> None:
    result = _run("03_align.sh", "iu_xray", RRG_HOME=str(rrg_home))
    assert result.returncode == 2 and "RRG_TEXT_PATH is not set" in result.stderr
    result = _run("03_align.sh", "iu_xray", RRG_HOME=str(rrg_home), RRG_TEXT_PATH=str(rrg_home / "bert"))
    assert result.returncode == 2 and f"{rrg_home}/bert/config.json (the report encoder folder" in result.stderr


def test_stage_config_and_accelerate_config_are_checked(rrg_home: Path) -> None:
    result = _run("02_pretrain.sh", "mimic_cxr", RRG_HOME=str(rrg_home), ACCEL="nope.yaml")
    assert result.returncode == 2
    assert "accelerate_configs/nope.yaml (set ACCEL to a file in accelerate_configs/)" in result.stderr
    if not (REPO / "stages/configs/pretrain/mimic_cxr.yaml").exists():
        assert "stages/configs/pretrain/mimic_cxr.yaml (the stage config for mimic_cxr)" in result.stderr


def test_reproduce_all_stops_at_the_first_failing_step(rrg_home: Path) -> None:
    result = _run("reproduce_all.sh", "iu_xray", RRG_HOME=str(rrg_home), ACCEL="nope.yaml")
    assert result.returncode == 2
    assert "== 01_prepare_data iu_xray" in result.stdout and "== 02_pretrain iu_xray" in result.stdout
    assert "== 03_align" not in result.stdout


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("iu_xray", "2 3 arm_small --data.dataset iu_xray --data.views 2 --data.max_words 60 --data.image_size 192"),
        (
            "mimic_cxr",
            "1 3 arm_base --data.dataset mimic_cxr --data.views 1 --data.max_words 100 --data.image_size 192",
        ),
        (
            "chexpert_plus",
            "1 3 arm_base --data.dataset chexpert_plus --data.views 1 --data.max_words 100 --data.image_size 192 "
            "--data.skip_empty_findings true --data.image_suffix .png",
        ),
    ],
)
def test_dataset_settings_follow_the_papers(dataset: str, expected: str) -> None:
    env_file = SCRIPTS / "datasets" / f"{dataset}.env"
    shown = 'echo "$RRG_VIEWS $RRG_NUM_BEAMS $RRG_VISION ${RRG_DATA_ARGS[*]}"'
    result = subprocess.run(["bash", "-c", f". {env_file}; {shown}"], capture_output=True, text=True)
    assert result.stdout.strip() == expected


# A step or two of every stage on tiny models: 64 px tiny-ARM encoder, tiny BERT, tiny Llama-family LLM folder;
# batches of one study, two for PPO (whitening advantages needs two tokens).
TINY = ["--data.image_size", "64", "--train.max_steps", "2", "--train.batch_size", "1", "--checkpoint.save_every", "0",
        "--optim.warmup_steps", "0"]
CHAIN = {
    "01_prepare_data.sh": [],
    "02_pretrain.sh": [*TINY, "--vision", "tiny-arm", "--train.num_workers", "0", "--arm.decoder_depth", "1",
                       "--arm.decoder_heads", "2", "--arm.decoder_dim", "32"],
    "03_align.sh": [*TINY, "--train.num_workers", "0", "--model.embed_dim", "16", "--train.eval_every", "0",
                    "--eval.batch_size", "1", "--eval.ks", "[1]", "--train.select_metric", "i2t_recall@1"],
    "04_sft.sh": [*TINY, "--train.num_workers", "0", "--model.llm_dtype", "float32", "--model.lora.r", "2",
                  "--prompting.context.mode", "none", "--prompting.context.residual", "false",
                  "--train.eval_every", "0", "--eval.max_samples", "2", "--eval.num_beams", "1",
                  "--eval.max_new_tokens", "4", "--eval.metrics", "[bleu, ce]"],
    "05_ppo.sh": [*TINY, "--train.max_steps", "1", "--train.batch_size", "2", "--ppo.minibatch_size", "2",
                  "--ppo.ppo_epochs", "1",
                  "--generation.max_new_tokens", "4", "--eval.max_samples", "2", "--eval.max_new_tokens", "4",
                  "--eval.metrics", "[bleu, ce]", "--reward.funcs", "[chexpert_f1]",
                  "--reward.require_weights", "false", "--lora.r", "2"],
    "06_eval.sh": ["--num-beams", "1", "--max-new-tokens", "4", "--batch-size", "2"],
}


def add_training_patient(fixture: FixturePaths, source: str, new: str) -> None:
    """Copies the CSV rows and images of training patient ``source`` as patient ``new`` (two studies to train on)."""
    with fixture.annotation_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames, list(reader)
    copies = [{k: v.replace(source, new) for k, v in row.items()} for row in rows if row["deid_patient_id"] == source]
    for row in copies:
        image = Path(row["path_to_image"]).with_suffix(".png")
        (fixture.image_root / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fixture.image_root / str(image).replace(new, source), fixture.image_root / image)
    with fixture.annotation_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows + copies)


@pytest.mark.integration
@pytest.mark.parametrize("dataset", ["iu_xray", "chexpert_plus"])
def test_the_whole_chain_runs_on_real_layouts(dataset: str, tmp_path: Path) -> None:
    if dataset == "iu_xray":
        write_iu_xray_fixture(tmp_path / "data")
        reports = list(IU_REPORTS)
    else:
        add_training_patient(write_chexpert_plus_fixture(tmp_path / "data")[0], "patient00001", "patient00004")
        reports = ["Heart size is normal. No effusion.", "Mild cardiomegaly.", "Small right pleural effusion."]
    llm = write_tiny_llm(tmp_path / "models" / "llm", "llama", [*reports, "describe the findings"])
    bert = tiny_text_encoder(reports, tmp_path / "models" / "bert")
    env = {"RRG_HOME": str(tmp_path), "ACCEL": "cpu_debug.yaml", "DEVICE": "cpu", "RRG_LLM": "llama-tiny",
           "RRG_LLM_PATH": str(llm), "RRG_TEXT_PATH": str(bert)}
    for script, extra in CHAIN.items():
        result = _run(script, dataset, *extra, timeout=600, **env)
        assert result.returncode == 0, f"{script}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        if script == "01_prepare_data.sh":
            sizes = dict(re.findall(rf"^{dataset} (\w+): (\d+) studies", result.stdout, flags=re.M))
            assert sizes.keys() == {"train", "val", "test"} and all(int(n) > 0 for n in sizes.values()), sizes
    run_root = tmp_path / "runs" / dataset
    for stage in ("pretrain", "align", "sft", "ppo"):
        assert (run_root / stage / "export" / EXPORT_MARKER).is_file(), stage
    # The overrides reached the stages (last on the command line, they win over the scripts' own).
    assert yaml.safe_load((run_root / "sft" / "config.yaml").read_text())["train"]["max_steps"] == 2
    table = (run_root / "eval" / "table.md").read_text()
    assert "| sft " in table and "| ppo " in table
    assert (run_root / "eval" / "viewer.html").is_file()
