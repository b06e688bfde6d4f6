"""The stage scripts as modules, for tests and benchmarks that call a stage's ``main`` or read its config class.

``stages/`` is not a package (stages are entry points, and library code never imports them), so they are loaded
from their file; each is registered in ``sys.modules`` first because dataclasses resolve string annotations there.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
STAGE_NAMES = ("pretrain", "align", "sft", "ppo")


@functools.cache
def load_stage(name: str) -> ModuleType:
    """``stages/<name>.py`` imported once per process as module ``stage_<name>``."""
    if name not in STAGE_NAMES:
        raise ValueError(f"unknown stage {name!r}; choose one of {STAGE_NAMES}")
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def stage_config_class(name: str) -> type:
    """The stage's ``*StageConfig`` dataclass."""
    return next(v for k, v in vars(load_stage(name)).items() if k.endswith("StageConfig"))
