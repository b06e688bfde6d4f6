"""Stage hand-off by name under one run root: ``<run_root>/<stage>/{export,checkpoints,metrics.jsonl}``.

Resume (optimizer, RNG, step) lives in ``checkpoints/`` and is only read by the same stage; the next stage
reads ``export/`` (weights + resolved config), never another stage's optimizer state.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STAGES: tuple[str, ...] = ("pretrain", "align", "sft", "ppo")
EXPORT_MARKER = "export_complete.json"


# Exports holding a whole report generator (LLaVA layout), and the stage that starts from one; the other stages
# start from a vision encoder.
GENERATOR_STAGES: tuple[str, ...] = ("sft", "ppo")
STARTS_FROM_GENERATOR: tuple[str, ...] = ("ppo",)


class MissingStageOutputError(FileNotFoundError):
    """The stage a run starts from has not exported its weights."""


class WrongStageOutputError(ValueError):
    """``run.init_from`` holds weights of a kind the stage cannot start from."""


@dataclass(frozen=True)
class StageDirs:
    """Paths a stage writes under the run root."""

    run_root: Path
    stage: str

    @property
    def root(self) -> Path:
        return self.run_root / self.stage

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def make(self) -> StageDirs:
        self.root.mkdir(parents=True, exist_ok=True)
        return self


def resolve_init(run_root: str | Path, stage: str, init_from: str | None) -> Path | None:
    """Where a stage's starting weights come from.

    Args:
        run_root: the run root shared by all stages.
        stage: the stage asking (for the error message).
        init_from: ``None`` (start from scratch), a stage name (its export under ``run_root``) or a directory.

    Raises:
        MissingStageOutputError: the named stage has no complete export, or the directory does not exist.
        WrongStageOutputError: a report-generator export (sft/ppo) given to a stage that starts from a vision
            encoder, or the reverse.
    """
    if init_from is None:
        return None
    if init_from in STAGES:
        path = StageDirs(Path(run_root), init_from).export
        if not (path / EXPORT_MARKER).is_file():
            raise MissingStageOutputError(
                f"stage '{stage}' starts from the '{init_from}' export, but {path} has no complete export "
                f"({EXPORT_MARKER} missing): run stages/{init_from}.py with the same run.run_root first, "
                "or set run.init_from to a directory or null"
            )
    else:
        path = Path(init_from)
        if not path.is_dir():
            raise MissingStageOutputError(f"stage '{stage}': run.init_from={init_from!r} is neither a stage name "
                                          f"{list(STAGES)} nor an existing directory")
    if _is_generator_export(path) != (stage in STARTS_FROM_GENERATOR):
        wanted = "an sft or ppo export (a report generator)" if stage in STARTS_FROM_GENERATOR else \
            "a vision encoder (a pretrain or align export, or a vision model folder)"
        raise WrongStageOutputError(f"stage '{stage}': run.init_from={init_from!r} ({path}) is "
                                    f"{'' if _is_generator_export(path) else 'not '}a report-generator export; "
                                    f"{stage} starts from {wanted}")
    return path


def _is_generator_export(path: Path) -> bool:
    """Whether ``path`` holds a whole report generator: a LLaVA ``config.json``, else a marker naming sft/ppo."""
    for name, key in (("config.json", "model_type"), (EXPORT_MARKER, "stage")):
        try:
            value = json.loads((path / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if value is not None:
            return value == "llava" or value in GENERATOR_STAGES
    return False


def mark_export_complete(export_dir: Path, info: dict) -> None:
    """Written last, so a crash mid-export never looks like a finished hand-off."""
    (export_dir / EXPORT_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True))


@contextlib.contextmanager
def writing_export(export_dir: Path, info: dict) -> Iterator[Path]:
    """Yields an empty temporary folder to write an export into; on success the marker goes in last and the
    folder replaces ``export_dir``. An export interrupted midway (re-exports included) leaves the previous
    complete export in place, never its marker beside new partial weights.

    Args:
        export_dir: final location (``StageDirs.export``).
        info: contents of the completion marker.
    """
    export_dir = Path(export_dir)
    tmp, old = export_dir.with_name(f".tmp_{export_dir.name}"), export_dir.with_name(f".old_{export_dir.name}")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    yield tmp
    mark_export_complete(tmp, info)
    if export_dir.exists():
        export_dir.rename(old)
    tmp.rename(export_dir)
    if old.exists():
        shutil.rmtree(old)
