"""Keeps what identifies the training machine out of an export: absolute paths, the user's and the host's names,
and training reports that ``use_reports`` did not ask for.

The export scrubs the one such field the libraries write (:func:`scrub_model_paths`) and fails on anything
:func:`find_leaks` still finds, before it is marked complete; the Hub push refuses the same findings.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

# Vocabularies (the LLM publisher's, or the words of the training reports) are written from no machine state, and a
# code-trained LLM's holds path-like tokens ("/usr", "/api").
VOCABULARY_FILES = frozenset({"tokenizer.json", "vocab.json", "vocab.txt", "merges.txt"})
# Default account and host names identify no one, and some are ordinary words ("aortic root").
GENERIC_NAMES = frozenset({"root", "user", "admin", "administrator", "guest", "test", "ubuntu", "debian", "ec2-user",
                           "runner", "vagrant", "jovyan", "localhost"})
MIN_NAME_LENGTH = 3
# POSIX paths of two or more components not inside a URL or a relative path, Windows drive paths, home-relative paths.
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~>\])}-])(?:/[\w.~+@-]+){2,}/?|(?<!\w)[A-Za-z]:[\\/]{1,2}\w[^\s\"']*"
                            r"|(?<![\w/])~/[\w.-]+")
BANK_META = "prompting/memory_bank.json"
PROMPTING_SETTINGS = "prompting/prompting.yaml"
_SNIFF_BYTES = 8192


class ExportLeakError(ValueError):
    """An export would carry what identifies the training machine, or reports nobody asked it to carry."""


def machine_names() -> tuple[str, ...]:
    """This machine's user and host names worth looking for: generic and very short ones are left out."""
    names = set()
    with contextlib.suppress(OSError, KeyError):  # no user name in some containers
        names.add(getpass.getuser())
    host = socket.gethostname()
    names.update({host, host.split(".")[0]})
    return tuple(sorted(n for n in names if len(n) >= MIN_NAME_LENGTH and n.lower() not in GENERIC_NAMES))


def text_leaks(text: str, names: Sequence[str] | None = None) -> list[str]:
    """Absolute paths, this machine's home folder and ``names`` (default: :func:`machine_names`) found in ``text``.

    Returns:
        Each finding once, as ``path '...'`` or ``name '...'``.
    """
    names = machine_names() if names is None else names
    found = [f"path {m.group(0)!r}" for m in _ABSOLUTE_PATH.finditer(text)]
    home = os.path.expanduser("~")  # "~" itself when there is no home folder
    home_pattern = rf"(?<![\w/.-]){re.escape(home)}(?![\w.-])"
    if len(home) > 1 and not any(home in f for f in found) and re.search(home_pattern, text):
        found.append(f"path {home!r}")
    for name in names:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", text, flags=re.IGNORECASE):
            found.append(f"name {name!r}")
    return list(dict.fromkeys(found))


def _read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (weights, images)."""
    with path.open("rb") as f:
        if b"\0" in f.read(_SNIFF_BYTES):
            return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def _unrequested_reports(export_dir: Path) -> str | None:
    meta_path = export_dir / BANK_META
    if not meta_path.is_file() or "reports" not in json.loads(meta_path.read_text()):
        return None
    settings_path = export_dir / PROMPTING_SETTINGS
    settings = (yaml.safe_load(settings_path.read_text()) or {}) if settings_path.is_file() else {}
    if (settings.get("context") or {}).get("use_reports") is True:
        return None
    return f"{BANK_META}: training reports stored, but {PROMPTING_SETTINGS} has context.use_reports false"


def find_leaks(export_dir: str | Path, files: Iterable[str] | None = None, names: Sequence[str] | None = None
               ) -> list[str]:
    """What an export must not carry, one ``"<file>: <finding>"`` per finding (empty when clean).

    Args:
        export_dir: the export folder.
        files: relative paths to scan (default: every file); vocabularies and binary files are skipped.
        names: user/host names to look for (default: :func:`machine_names`).
    """
    export_dir = Path(export_dir)
    names = machine_names() if names is None else names
    if files is None:
        files = (p.relative_to(export_dir).as_posix() for p in export_dir.rglob("*") if p.is_file())
    files = sorted(files)
    problems = []
    for relative in files:
        text = None if Path(relative).name in VOCABULARY_FILES else _read_text(export_dir / relative)
        if text is not None:
            # The code files are this package's source, the same on every machine: a user named like a word in it
            # ("model", "scan") is no leak there, while a path written into it still is.
            looked_for = () if relative.endswith(".py") else names
            problems += [f"{relative}: {finding}" for finding in text_leaks(text, looked_for)]
    if BANK_META in files and (reports := _unrequested_reports(export_dir)) is not None:
        problems.append(reports)
    return problems


def _drop_name_or_path(data: Any) -> bool:
    """Removes every ``_name_or_path`` key in place; returns whether there was one."""
    if isinstance(data, dict):
        found = "_name_or_path" in data
        data.pop("_name_or_path", None)
        children = list(data.values())
    elif isinstance(data, list):
        found, children = False, data
    else:
        return False
    for child in children:
        found = _drop_name_or_path(child) or found
    return found


def scrub_model_paths(export_dir: str | Path) -> None:
    """Drops the ``_name_or_path`` that transformers writes into nested configs (the folder a sub-model, e.g. the
    vision encoder, was loaded from) from every JSON file of the export; loading sets it afresh anyway."""
    for path in Path(export_dir).rglob("*.json"):
        if path.name in VOCABULARY_FILES:
            continue
        with contextlib.suppress(ValueError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if _drop_name_or_path(data):
                path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
