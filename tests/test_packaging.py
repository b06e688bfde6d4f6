import re
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]


def test_every_source_folder_ships_in_the_wheel():
    # An explicit package list once left out rlhf_rrg.export: a non-editable install could not load exports.
    pyproject = (REPO / "pyproject.toml").read_text()
    found = re.search(r'\[tool\.setuptools\.packages\.find\]\ninclude = \[(.*)\]', pyproject)
    assert found, "pyproject.toml must discover packages with [tool.setuptools.packages.find]"
    include = re.findall(r'"([^"]+)"', found.group(1))
    shipped = set(find_packages(str(REPO), include=include))
    sources = {str(p.parent.relative_to(REPO)).replace("/", ".")
               for top in ("rlhf_rrg", "rewards") for p in (REPO / top).rglob("*.py")}
    assert sources <= shipped, sorted(sources - shipped)
