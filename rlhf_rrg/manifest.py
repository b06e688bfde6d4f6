"""Sizes and SHA-256 hashes of a folder's files, and the check that the files still match them.

Checkpoints (``manifest.json``) and exports (``export_complete.json``) record them when written and check them when
read, so a damaged file is named instead of failing later inside a loader that names neither folder nor file.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path, skip: Collection[str] = ()) -> dict[str, dict[str, Any]]:
    """``relative path -> {"size", "sha256"}`` of every file under ``folder`` but the relative paths in ``skip``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in skip)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


# Folders this process found intact, with the (name, size, mtime) of their files: a stage's setup and the load that
# follows check the same folder, and hashing tens of GB twice would double the wait.
_intact: dict[Path, tuple] = {}


def _file_stats(folder: Path) -> tuple:
    return tuple(sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in folder.rglob("*") if p.is_file()))


def files_problem(folder: Path, entries: Mapping[str, Mapping[str, Any]], record: str) -> str | None:
    """Why the files under ``folder`` differ from ``entries`` (naming the file), or None when every one matches.

    Args:
        folder: the folder the entries describe.
        entries: :func:`file_entries` as recorded when the folder was written.
        record: what holds the entries, for the message (e.g. ``"the manifest"``).
    """
    with contextlib.suppress(OSError):
        if _intact.get(folder.resolve()) == _file_stats(folder):
            return None
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{path} has {path.stat().st_size} bytes, {record} says {entry['size']}"
        if sha256_file(path) != entry["sha256"]:
            return f"{path} does not match its SHA-256 in {record}"
    _intact[folder.resolve()] = _file_stats(folder)
    return None
