"""One-way imports: the import-linter contracts of pyproject.toml hold, and the part-level import graph (imports
inside functions included) has no cycle, ``rewards`` imports nothing of ``rlhf_rrg`` and ``models`` nothing above it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def part_of(module: str) -> str | None:
    """The top-level part a module belongs to: ``rewards``, ``stages`` or ``rlhf_rrg.<package or module>``."""
    head = module.split(".")
    if head[0] in ("rewards", "stages"):
        return head[0]
    if head[0] == "rlhf_rrg" and len(head) > 1:
        return f"rlhf_rrg.{head[1]}"
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, at any depth (functions included), relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def part_graph() -> dict[str, dict[str, set[str]]]:
    """part -> imported part -> the ``module -> module`` imports behind that edge."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for top in ("rewards", "rlhf_rrg", "stages"):
        for path in sorted((REPO / top).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            source = part_of(module)
            for name in imported_modules(path, module):
                target = part_of(name)
                if source and target and target != source:
                    graph[source][target].add(f"{module} -> {name}")
    return graph


def test_import_contracts_are_kept():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_rewards_imports_nothing_from_rlhf_rrg():
    edges = part_graph()["rewards"]
    assert not edges, {target: sorted(lines) for target, lines in edges.items()}


@pytest.mark.parametrize("above", ["rlhf_rrg.export", "rlhf_rrg.losses", "rlhf_rrg.rl", "rlhf_rrg.prompting",
                                   "rlhf_rrg.retrieval", "rlhf_rrg.training"])
def test_models_import_nothing_above_them(above):
    assert above not in part_graph()["rlhf_rrg.models"], sorted(part_graph()["rlhf_rrg.models"][above])


def test_library_imports_no_stage_script():
    graph = part_graph()
    assert not [source for source, targets in graph.items() if "stages" in targets and source != "stages"]


def test_parts_form_no_import_cycle():
    graph = part_graph()
    state: dict[str, str] = {}

    def visit(part: str, path: list[str]) -> None:
        state[part] = "open"
        for target in sorted(graph.get(part, {})):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [part, target] if target in path else [part, target]
                pytest.fail(f"import cycle between parts: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, part])
        state[part] = "done"

    for part in sorted(graph):
        if part not in state:
            visit(part, [])
