"""push_export up to the upload call: the folder it pushes, what it leaves out, what it refuses to publish."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import yaml
from huggingface_hub import HfApi

from rlhf_rrg.export.hub import hub_files, main, push_export
from rlhf_rrg.runroot import EXPORT_MARKER


class StubApi:
    """Records the two HfApi calls push_export makes (no network), checked against HfApi's real signatures."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        inspect.signature(HfApi.create_repo).bind(self, repo_id, **kwargs)
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        inspect.signature(HfApi.upload_folder).bind(self, **kwargs)
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "https://huggingface.co/user/rrg/commit/0"


def test_push_uploads_the_export_with_its_card_and_code(make_run):
    export = make_run("iu_xray") / "ppo" / "export"
    (export / "README.md").unlink()
    api = StubApi()
    assert push_export(export, "user/rrg", api=api) == "https://huggingface.co/user/rrg/commit/0"
    (_, repo, create), (_, _, upload) = api.calls
    assert repo == "user/rrg" and create["private"] is True and create["exist_ok"] is True
    assert upload["folder_path"] == str(export)
    files = hub_files(export)
    for name in ("README.md", "config.json", "model.safetensors", "modeling_rrg.py", "scan.py", "processor.py",
                 "processor_config.json", "tokenizer.json", "prompting/prompting.yaml"):
        assert name in files
    assert EXPORT_MARKER not in files and not any(f.startswith("adapter/") for f in files)
    assert "scores/bleu_4" in (export / "README.md").read_text()  # the card was rewritten with the eval table


def _with_retrieved_context(export):
    settings = export / "prompting" / "prompting.yaml"
    prompting = yaml.safe_load(settings.read_text())
    prompting["context"]["mode"] = "retrieved"
    settings.write_text(yaml.safe_dump(prompting))
    return export


def test_refuses_unfinished_exports_and_credentialed_context(make_run, capsys):
    run = make_run("mimic_cxr")
    export = _with_retrieved_context(run / "sft" / "export")
    with pytest.raises(ValueError, match="mimic_cxr training images .* credentialed"):
        push_export(export, "user/rrg", api=StubApi())
    api = StubApi()
    push_export(export, "user/rrg", allow_training_data=True, api=api)
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    (export / EXPORT_MARKER).unlink()
    assert main([str(export), "user/rrg", "--dry-run", "--allow-training-data"]) == 2
    assert "not a finished export" in capsys.readouterr().err


def test_dry_run_lists_the_files(make_run, capsys):
    export = make_run("iu_xray") / "sft" / "export"
    assert main([str(export), "user/rrg", "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == hub_files(export)


def test_an_export_copied_out_of_its_run_still_says_its_data_is_credentialed(make_run, tmp_path):
    run = make_run("mimic_cxr")
    copy = tmp_path / "shared" / "export"
    shutil.copytree(_with_retrieved_context(run / "ppo" / "export"), copy)
    shutil.rmtree(run)  # no run root, no config.yaml: the export's own record is all there is
    with pytest.raises(ValueError, match="mimic_cxr training images .* credentialed"):
        push_export(copy, "user/rrg", api=StubApi())


def test_an_export_that_records_no_data_source_is_refused_without_consent(make_run):
    export = _with_retrieved_context(make_run("iu_xray") / "sft" / "export")
    (export / EXPORT_MARKER).write_text(json.dumps({"stage": "sft"}))  # marked before markers recorded lineage
    with pytest.raises(ValueError, match="does not record the dataset of every stage.*--allow-training-data"):
        push_export(export, "user/rrg", api=StubApi())
    api = StubApi()
    push_export(export, "user/rrg", allow_training_data=True, api=api)
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]


def test_refuses_to_publish_a_machine_path(make_run, capsys):
    export = make_run("iu_xray") / "ppo" / "export"
    config = json.loads((export / "config.json").read_text())
    config["vision_config"]["_name_or_path"] = "/home/alice/runs/demo/align/export/vision"
    (export / "config.json").write_text(json.dumps(config))
    assert main([str(export), "user/rrg", "--dry-run"]) == 2
    assert "config.json: path '/home/alice/runs/demo/align/export/vision'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="would publish config.json: path"):
        push_export(export, "user/rrg", api=StubApi())
