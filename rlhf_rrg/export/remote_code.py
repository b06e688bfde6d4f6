"""Saves the model/config/processor code into an export and names it in ``auto_map`` (``trust_remote_code``).

transformers' remote-code loader copies only the files ``auto_map`` names plus their relative imports, so the code is
written flat next to the weights: each module this package's entry classes need (found by following their
``rlhf_rrg`` imports) is copied with ``from rlhf_rrg.<pkg>.<name> import`` rewritten to ``from .<name> import``. The
package's own files stay the single source; an import the export cannot carry fails here, not on a user's machine.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

PACKAGES = ("rlhf_rrg", "rewards")
# auto_map entry -> "module.Class"; the module names are the package modules' file names.
AUTO_MAP = {
    "AutoConfig": "modeling_rrg.RRGLlavaConfig",
    "AutoModelForImageTextToText": "modeling_rrg.RRGLlavaForConditionalGeneration",
    "AutoProcessor": "processor.RRGProcessor",
}
ENTRY_MODULES = ("rlhf_rrg.export.modeling_rrg", "rlhf_rrg.models.processor")


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find the source of {module}")
    return Path(spec.origin)


def _package_imports(tree: ast.Module, module: str) -> list[ast.ImportFrom]:
    """``from rlhf_rrg... import`` statements of a module; ``import rlhf_rrg...`` cannot be rewritten, so it fails."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in PACKAGES for a in node.names):
            raise ValueError(f"{module} line {node.lineno}: 'import {node.names[0].name}' cannot go into an export; "
                             "use 'from <module> import <name>'")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in PACKAGES:
            found.append(node)
    return found


def remote_sources() -> dict[str, str]:
    """File name -> rewritten source of every module the exported classes need.

    Raises:
        ValueError: when two needed modules share a file name (the export is flat).
    """
    pending, seen, files = list(ENTRY_MODULES), set(), {}
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _source(module)
        lines = path.read_text().splitlines(keepends=True)
        for node in _package_imports(ast.parse("".join(lines)), module):
            pending.append(node.module)
            line = lines[node.lineno - 1]
            relative = f"from .{node.module.rsplit('.', 1)[-1]} import"
            lines[node.lineno - 1] = line.replace(f"from {node.module} import", relative, 1)
        if path.name in files:
            raise ValueError(f"two exported modules are both named {path.name}; the export's code folder is flat")
        files[path.name] = "".join(lines)
    return files


def _add_auto_map(json_path: Path, auto_map: dict[str, str]) -> None:
    data = json.loads(json_path.read_text())
    data["auto_map"] = auto_map
    json_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_remote_code(export_dir: str | Path) -> list[str]:
    """Writes the code files into ``export_dir`` and adds ``auto_map`` to its ``config.json`` and
    ``processor_config.json`` (both written by ``save_pretrained`` first).

    Returns:
        The code file names written.
    """
    export_dir = Path(export_dir)
    sources = remote_sources()
    for name, text in sources.items():
        (export_dir / name).write_text(text)
    _add_auto_map(export_dir / "config.json", AUTO_MAP)
    _add_auto_map(export_dir / "processor_config.json", {"AutoProcessor": AUTO_MAP["AutoProcessor"]})
    return sorted(sources)
