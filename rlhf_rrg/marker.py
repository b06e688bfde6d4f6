"""``export_complete.json``, written last into an export: it marks the export complete and records what the export is,
in a form that means the same on any machine.

Besides the writer's own keys it holds ``files`` (size and SHA-256 of each file, checked when the export is loaded),
``export_id`` (a digest of ``files``: evaluation scores quote it, so a model card shows only its own export's scores)
and ``lineage`` (the stages and data that made the export, see :func:`rlhf_rrg.runroot.mark_export_complete`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlhf_rrg.leaks import ExportLeakError, text_leaks
from rlhf_rrg.manifest import file_entries, files_problem

EXPORT_MARKER = "export_complete.json"
# The model card is rewritten after the export is marked (the Hub push adds the scores written since): not checked.
UNCHECKED_FILES = (EXPORT_MARKER, "README.md")
_LOCAL_PATH = re.compile(r"^(?:/|~|[A-Za-z]:[\\/])")


def portable(value: Any, run_root: Path) -> Any:
    """``value`` (a config, nested) with each absolute path made relative to ``run_root`` when inside it, else cut
    to its last component: the folders of the training machine mean nothing elsewhere and may name its user."""
    if isinstance(value, Mapping):
        return {key: portable(item, run_root) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(item, run_root) for item in value]
    if not isinstance(value, str) or not _LOCAL_PATH.match(value):
        return value
    root = run_root.resolve()
    if value.startswith(("/", "~")) and (path := Path(value).expanduser().resolve()).is_relative_to(root):
        return path.relative_to(root).as_posix()
    return re.split(r"[\\/]", value.rstrip("\\/"))[-1]


def read_marker(export_dir: Path) -> dict[str, Any]:
    """The marker's content; empty when there is none or it cannot be read."""
    try:
        data = json.loads((Path(export_dir) / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(export_dir: Path, info: Mapping[str, Any]) -> None:
    """Writes ``info`` plus ``files`` and ``export_id``; call it when every other file is written.

    Raises:
        ExportLeakError: ``info`` holds an absolute path or a user/host name (pass it through :func:`portable`).
    """
    files = file_entries(export_dir, skip=UNCHECKED_FILES)
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    text = json.dumps({**info, "files": files, "export_id": digest}, indent=2, sort_keys=True)
    leaks = text_leaks(json.dumps(dict(info)))
    if leaks:
        raise ExportLeakError(f"{export_dir / EXPORT_MARKER} would record {', '.join(leaks)}")
    (export_dir / EXPORT_MARKER).write_text(text)


def export_id(export_dir: Path) -> str | None:
    """The id of a complete export (None when unmarked, or marked before exports had ids)."""
    return read_marker(export_dir).get("export_id")


def export_problem(export_dir: Path) -> str | None:
    """Why a complete-marked export cannot be used (naming the file), or None.

    Folders without a marker, and exports marked before markers recorded their files, are not checked.
    """
    marker = Path(export_dir) / EXPORT_MARKER
    if not marker.is_file():
        return None
    try:
        files = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError, AttributeError) as err:
        return f"{marker} is unreadable ({err})"
    return None if files is None else files_problem(Path(export_dir), files, EXPORT_MARKER)
