"""Pushes a finished export to the Hugging Face Hub: the merged model, its code, processor, prompting and card.

    python -m rlhf_rrg.export.hub runs/iu_xray/ppo/export user/cxr-report-generator [--dry-run]

The LoRA ``adapter/`` stays local (its base is a folder of the training machine); the Hub copy is the merged model
that ``AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)`` loads.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi

from rlhf_rrg.export.model_card import config_value, read_yaml, write_model_card
from rlhf_rrg.leaks import ExportLeakError, find_leaks
from rlhf_rrg.retrieval.context import CREDENTIALED_DATASETS
from rlhf_rrg.runroot import EXPORT_MARKER, recorded_lineage

HUB_IGNORE = ("adapter/*", EXPORT_MARKER)


def hub_files(export_dir: str | Path) -> list[str]:
    """The export's files (relative, sorted) that :func:`push_export` uploads."""
    export_dir = Path(export_dir)
    files = (p.relative_to(export_dir).as_posix() for p in export_dir.rglob("*") if p.is_file())
    return sorted(f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in HUB_IGNORE))


def check_publishable(export_dir: Path, allow_training_data: bool) -> None:
    """Refuses an unfinished export, and one carrying training images/reports of credentialed data, or of data its
    marker does not record (fail closed), without consent.

    Raises:
        ValueError: naming the export and what to do.
    """
    if not (export_dir / EXPORT_MARKER).is_file() or not (export_dir / "config.json").is_file():
        raise ValueError(f"{export_dir} is not a finished export ({EXPORT_MARKER} or config.json missing)")
    mode = config_value(read_yaml(export_dir / "prompting" / "prompting.yaml"), "context.mode") or "none"
    if mode == "none" or allow_training_data:
        return
    # The export's own record: configs of a run root may be gone, or belong to another run.
    lineage = recorded_lineage(export_dir) or []
    datasets = [config_value(entry.get("config") or {}, "data.dataset") for entry in lineage]
    credentialed = sorted(set(datasets) & set(CREDENTIALED_DATASETS))
    if credentialed:
        raise ValueError(
            f"{export_dir}/prompting holds {', '.join(credentialed)} training images (the retrieval context) and "
            "that data is credentialed: pass allow_training_data (--allow-training-data) only if its data use "
            "agreement lets you publish them"
        )
    if not datasets or None in datasets:
        raise ValueError(
            f"{export_dir}/prompting holds training images (the retrieval context), and its {EXPORT_MARKER} does not "
            "record the dataset of every stage that made it (marked by an older version, or started from weights "
            "of unknown history): pass allow_training_data (--allow-training-data) only if you know that data may "
            "be published"
        )


def prepare_upload(export_dir: Path, allow_training_data: bool) -> list[str]:
    """Checks the export, rewrites its model card (picking up eval scores written since the export) and scans what
    will be uploaded for leaks.

    Returns:
        The files to upload (:func:`hub_files`).

    Raises:
        ValueError: see :func:`check_publishable`; :class:`ExportLeakError` naming each file and finding.
    """
    check_publishable(export_dir, allow_training_data)
    write_model_card(export_dir)
    files = hub_files(export_dir)
    leaks = find_leaks(export_dir, files)
    if leaks:
        raise ExportLeakError(f"{export_dir} would publish " + "; ".join(leaks))
    return files


def push_export(
    export_dir: str | Path,
    repo_id: str,
    private: bool = True,
    allow_training_data: bool = False,
    token: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Checks the export and its model card (:func:`prepare_upload`) and uploads it.

    Args:
        export_dir: a finished sft/ppo export.
        repo_id: ``user/name`` on the Hub; created if missing.
        private: create the repository as private.
        allow_training_data: confirm that training images/reports of a credentialed dataset may be published.
        token: Hub token (default: the logged-in one).
        api: the client to use (tests pass a stub).

    Returns:
        The commit URL the Hub answers with.
    """
    export_dir = Path(export_dir)
    prepare_upload(export_dir, allow_training_data)
    api = api if api is not None else HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(export_dir), repo_id=repo_id, repo_type="model", ignore_patterns=list(HUB_IGNORE),
        commit_message=f"Upload {json.loads((export_dir / EXPORT_MARKER).read_text()).get('stage', 'rrg')} export",
    )
    return str(commit)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", type=Path, help="a finished export folder (<run_root>/<stage>/export)")
    parser.add_argument("repo_id", help="Hub repository, user/name")
    parser.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    parser.add_argument("--allow-training-data", action="store_true",
                        help="publish credentialed training images/reports held in prompting/")
    parser.add_argument("--dry-run", action="store_true", help="write the card and list the files, upload nothing")
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            files = prepare_upload(args.export, args.allow_training_data)
            sys.stdout.write("".join(f"{name}\n" for name in files))
        else:
            sys.stdout.write(push_export(args.export, args.repo_id, not args.public, args.allow_training_data) + "\n")
    except ValueError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
