"""Nothing of the training machine in an export: what the scan finds, what it leaves alone, and a real SFT export."""

from __future__ import annotations

import getpass
import json
import socket

import pytest
import torch
import yaml

from rlhf_rrg.export.save import save_generator
from rlhf_rrg.leaks import ExportLeakError, find_leaks, machine_names, scrub_model_paths, text_leaks
from rlhf_rrg.models.rrg import RRGModelConfig, apply_lora, build_processor, build_rrg_model, load_rrg
from rlhf_rrg.prompting.generator import PromptingConfig, ReportGenerator
from rlhf_rrg.runroot import EXPORT_MARKER, StageDirs, writing_export
from rlhf_rrg.testing.tiny_models import tiny_rrg

NAMES = ("alice", "gpu-node-7")


def test_absolute_paths_and_machine_names_are_found(monkeypatch):
    monkeypatch.setenv("HOME", "/home1")  # one component, as root's /root
    windows = "C:\\Users\\bob\\runs"
    text = f"vision: /data/runs/demo/align/export/vision\nlog: {windows}\nhome: /home1\ncache: ~/hf\nby: GPU-NODE-7"
    assert text_leaks(text, NAMES) == [
        "path '/data/runs/demo/align/export/vision'", f"path {windows!r}", "path '~/hf'", "path '/home1'",
        "name 'gpu-node-7'",
    ]


@pytest.mark.parametrize("text", [
    "https://huggingface.co/user/rrg/commit/0", "runs/demo/sft/export", "../sft/export", "<run_root>/eval/x/y",
    "${RRG_HOME}/data/x", "a / b // c", "and/or 1/2/3", "malice", "alices",
])
def test_urls_relative_paths_and_longer_words_are_not_leaks(text):
    assert text_leaks(text, NAMES) == []


def test_generic_and_short_machine_names_are_not_looked_for(monkeypatch):
    monkeypatch.setattr(getpass, "getuser", lambda: "root")
    monkeypatch.setattr(socket, "gethostname", lambda: "vm")
    assert machine_names() == ()
    monkeypatch.setattr(getpass, "getuser", lambda: "alice")
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-node-7.cluster.example.org")
    assert machine_names() == ("alice", "gpu-node-7", "gpu-node-7.cluster.example.org")


def test_the_scan_reads_text_files_only_and_reports_only_when_asked(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"_name_or_path": "/home/alice/vision"}}))
    (tmp_path / "README.md").write_text("Trained by Alice.\n")
    (tmp_path / "tokenizer.json").write_text('{"vocab": {"/usr/bin/env": 1}}')  # a code-trained LLM's vocabulary
    (tmp_path / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0/home/alice/weights")
    (tmp_path / "scan.py").write_text('alice = "/opt/x/y"\n')  # the package's code: its paths count, its words not
    prompting = tmp_path / "prompting"
    prompting.mkdir()
    (prompting / "memory_bank.json").write_text(json.dumps({"ids": ["s1"], "reports": ["no acute disease ."]}))
    (prompting / "prompting.yaml").write_text(yaml.safe_dump({"context": {"mode": "retrieved", "use_reports": False}}))
    assert find_leaks(tmp_path, names=NAMES) == [
        "README.md: name 'alice'",
        "config.json: path '/home/alice/vision'",
        "config.json: name 'alice'",
        "scan.py: path '/opt/x/y'",
        "prompting/memory_bank.json: training reports stored, but prompting/prompting.yaml has context.use_reports "
        "false",
    ]
    assert find_leaks(tmp_path, files=["README.md"], names=()) == []
    (tmp_path / "scan.py").unlink()
    (prompting / "prompting.yaml").write_text(yaml.safe_dump({"context": {"mode": "retrieved", "use_reports": True}}))
    scrub_model_paths(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"vision_config": {}}
    assert find_leaks(tmp_path, names=()) == []


def test_an_export_that_would_leak_is_not_marked_and_the_previous_one_stays(tmp_path):
    export = StageDirs(tmp_path, "align").export
    with writing_export(export, {"version": 1}) as out:
        (out / "config.json").write_text(json.dumps({"text_config": {"_name_or_path": str(tmp_path / "llm")}}))
    assert "_name_or_path" not in (export / "config.json").read_text()  # scrubbed, then marked
    with pytest.raises(ExportLeakError, match=r"config.json: path '/data/x/annotation.json'"):
        with writing_export(export, {"version": 2}) as out:
            (out / "config.json").write_text(json.dumps({"note": "/data/x/annotation.json"}))
    assert json.loads((export / EXPORT_MARKER).read_text())["version"] == 1


def test_an_sft_export_of_a_run_carries_no_machine_path(tmp_path):
    """The demo's hand-off: an encoder loaded from the align export, LoRA on the LLM, data and run root absolute."""
    run = tmp_path / "run"
    torch.manual_seed(0)
    tiny = tiny_rrg(tmp_path)
    with writing_export(StageDirs(run, "align").export, {"stage": "align"}) as out:
        tiny.model.model.vision_tower.save_pretrained(out / "vision")
    vision = run / "align" / "export" / "vision"
    config = {"run": {"run_root": str(run), "init_from": "align"}, "model": {"vision": str(vision)},
              "data": {"dataset": "synthetic", "annotation_path": str(tmp_path / "data" / "annotation.json")}}
    StageDirs(run, "sft").make().config.write_text(yaml.safe_dump(config))
    model = apply_lora(build_rrg_model(RRGModelConfig(vision=str(vision), lora=tiny.config.lora), tiny.tokenizer),
                       tiny.config)
    generator = ReportGenerator(model, build_processor(model.base_model.model, tiny.tokenizer), PromptingConfig())
    export = StageDirs(run, "sft").export
    with writing_export(export, {"stage": "sft", "vision": str(vision)}) as out:
        save_generator(generator, out)

    assert find_leaks(export) == []
    for path in export.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            assert str(tmp_path) not in path.read_text(errors="ignore"), path
    base = json.loads((export / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "base" and (export / "adapter" / base / "config.json").is_file()
    load_rrg(export)
