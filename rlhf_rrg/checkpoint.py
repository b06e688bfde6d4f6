"""Exact resume: Accelerate state (model, optimizer, scheduler, RNG) plus a ``TrainState`` in ``step_{N:06d}``.

Saves go to a temporary folder that is renamed when complete, so an interruption mid-save leaves the previous
checkpoint as the latest one instead of a half-written folder.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

logger = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass
class CheckpointConfig:
    save_every: int = field(default=0, metadata={"help": "save every N optimizer steps; 0 saves only at the end"})
    keep: int = field(default=2, metadata={"help": "how many step_* folders to keep"})
    resume: bool = field(default=True, metadata={"help": "continue from the latest step_* folder if one exists"})

    def __post_init__(self) -> None:
        if self.save_every < 0:
            raise ValueError(f"checkpoint.save_every must be >= 0, got {self.save_every}")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class TrainState:
    """Loop position; registered with Accelerate so it is saved beside the model and optimizer."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def latest_step(directory: Path) -> int | None:
    """Step of the newest ``step_*`` folder under ``directory`` (None when there is none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = [int(m.group(1)) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name))]
    return max(steps) if steps else None


class CheckpointManager:
    """Saves and restores ``accelerator`` state under ``directory/step_{N:06d}``.

    Stateful objects (the ``TrainState``, KL controllers, reward normalisers) must be registered with
    ``accelerator.register_for_checkpointing`` before ``resume`` is called.
    """

    def __init__(self, accelerator: Accelerator, directory: Path, keep: int) -> None:
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int) -> Path:
        final = self.directory / f"step_{step:06d}"
        tmp = self.directory / f".tmp_step_{step:06d}"
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old)
            logger.info("saved checkpoint %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def resume(self, path: Path | None = None) -> Path | None:
        """Loads ``path`` (default: the latest checkpoint); returns what was loaded, or None when there is none."""
        path = path or self.latest()
        if path is None:
            return None
        if not Path(path).is_dir():
            found = [p.name for p in self.checkpoints()]
            raise FileNotFoundError(f"checkpoint {path} does not exist (found: {found})")
        self.accelerator.load_state(str(path))
        logger.info("resumed from %s", path)
        return Path(path)
