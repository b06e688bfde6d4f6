"""Suite-wide collection order."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Runs that launch processes first, then whole-stage runs, then the rest (stable within each). Under
    pytest-xdist (``scripts/test.sh``) each module goes to one worker in collection order, so a slow module
    collected last, such as the reproduction-script chain, ran alone at the end while the other worker idled."""
    def slowness(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("distributed") else 1 if item.get_closest_marker("integration") else 2

    items.sort(key=slowness)
