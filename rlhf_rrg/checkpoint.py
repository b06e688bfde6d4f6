"""Exact resume: Accelerate state (model, optimizer, scheduler, RNG) plus a ``TrainState`` in ``step_{N:06d}``.

Saves go to a temporary folder that is renamed when complete, so an interruption mid-save leaves the previous
checkpoint as the latest one instead of a half-written folder. Each checkpoint ends with ``manifest.json`` (size and
SHA-256 of every file, written last); resume checks it and falls back past damaged checkpoints, which are renamed
``invalid_step_*`` so rotation never counts them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from rlhf_rrg.manifest import file_entries, files_problem

logger = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """No checkpoint in the folder can be resumed from; the message names each damaged file."""


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


def step_dirs(directory: Path) -> list[Path]:
    """The ``step_*`` folders under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_step(directory: Path) -> int | None:
    """Step of the newest ``step_*`` folder under ``directory`` (None when there is none)."""
    found = step_dirs(directory)
    return int(_STEP_DIR.match(found[-1].name).group(1)) if found else None


def write_manifest(folder: Path) -> None:
    """Records size and SHA-256 of every file under ``folder``; call it after everything else is written."""
    entries = file_entries(folder, skip={MANIFEST})
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1, sort_keys=True))


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (naming the file), or None when every file matches its manifest."""
    manifest = folder / MANIFEST
    try:
        entries = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        return f"{manifest} is missing (damaged, or written before checkpoints had manifests)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{manifest} is unreadable ({err})"
    return files_problem(folder, entries, "the manifest")


def _set_aside(bad: Path) -> None:
    """Renames a damaged checkpoint to ``invalid_<name>``, or ``invalid_<name>.<n>`` when an earlier damaged copy of
    the same step (damaged again after a resume redid that step) already took that name."""
    target, n = bad.with_name(f"invalid_{bad.name}"), 0
    while target.exists():
        n += 1
        target = bad.with_name(f"invalid_{bad.name}.{n}")
    bad.rename(target)


def select_valid_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint under ``directory`` that passes :func:`checkpoint_problem` (main process only).

    Newer damaged checkpoints are renamed ``invalid_step_*`` with a warning naming the damaged file, so later
    rotation and resumes ignore them.

    Raises:
        CheckpointError: checkpoints exist but none is valid (nothing is renamed then).
    """
    found = step_dirs(directory)
    problems: list[tuple[Path, str]] = []
    for folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            for bad, why in problems:
                logger.warning("skipping damaged checkpoint %s (%s); resuming from %s", bad, why, folder)
                _set_aside(bad)
            return folder
        problems.append((folder, problem))
    if problems:
        raise CheckpointError(f"no valid checkpoint in {directory}: " + "; ".join(why for _, why in problems)
                              + ". Restore the files, or start over with --run.overwrite true")
    return None


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
        return step_dirs(self.directory)

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
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old)
            logger.info("saved checkpoint %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def resume(self, path: Path | None = None) -> Path | None:
        """Loads ``path`` (default: the newest valid checkpoint, see :func:`select_valid_checkpoint`); returns what
        was loaded, or None when there is none.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            CheckpointError: ``path`` (or every checkpoint) fails its manifest; the message names the file.
        """
        if path is None:
            if self.accelerator.is_main_process:
                select_valid_checkpoint(self.directory)
            self.accelerator.wait_for_everyone()
            path = self.latest()
        elif not Path(path).is_dir():
            found = [p.name for p in self.checkpoints()]
            raise FileNotFoundError(f"checkpoint {path} does not exist (found: {found})")
        elif (problem := checkpoint_problem(Path(path))) is not None:
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        if path is None:
            return None
        self.accelerator.load_state(str(path))
        logger.info("resumed from %s", path)
        return Path(path)

    def save_failed(self, step: int) -> Path:
        """Saves the current (failing) state to ``failed_step_{step}`` for inspection; rotation never removes it."""
        failed = self.directory / f"failed_step_{step:06d}"
        self.accelerator.save_state(str(failed))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            write_manifest(failed)
        return failed

    @contextlib.contextmanager
    def saving_state_on_error(self, step: int, where: str,
                              collective: tuple[type[Exception], ...] = ()) -> Iterator[None]:
        """Runs one training step; an exception saves the failing state first (like a NaN loss) and is re-raised,
        same type, with the saved folder and the last good checkpoint added to its message.

        Saving is collective, so with several processes only ``collective`` errors (raised on every process at
        once, e.g. a gathered NaN check) are saved; others say that nothing was saved.
        """
        try:
            yield
        except Exception as err:
            if self.accelerator.num_processes > 1 and not isinstance(err, collective):
                note = "state not saved (the other processes may not have failed)"
            else:
                note = f"state saved to {self.save_failed(step)}"
            _extend_message(err, f"{where} step {step}: {note}; the last good checkpoint is {self.latest()}")
            raise


def _extend_message(err: Exception, note: str) -> None:
    # Keeps the exception's type (callers catch it) while putting the note into str(err), not only the traceback.
    if len(err.args) == 1 and isinstance(err.args[0], str):
        err.args = (f"{err.args[0]}; {note}",)
    else:
        err.add_note(note)
