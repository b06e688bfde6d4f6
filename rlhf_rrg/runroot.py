"""Stage hand-off by name under one run root: ``<run_root>/<stage>/{export,checkpoints,metrics.jsonl}``.

Resume (optimizer, RNG, step) lives in ``checkpoints/`` and is only read by the same stage; the next stage
reads ``export/`` (weights + resolved config), never another stage's optimizer state. An export counts once its
marker (:mod:`rlhf_rrg.marker`) is written, and is checked against the marker when the next stage takes it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhf_rrg.leaks import ExportLeakError, find_leaks, scrub_model_paths
from rlhf_rrg.marker import EXPORT_MARKER, export_problem, portable, read_marker, write_marker

STAGES: tuple[str, ...] = ("pretrain", "align", "sft", "ppo")


# Exports holding a whole report generator (LLaVA layout), and the stage that starts from one; the other stages
# start from a vision encoder.
GENERATOR_STAGES: tuple[str, ...] = ("sft", "ppo")
STARTS_FROM_GENERATOR: tuple[str, ...] = ("ppo",)


class MissingStageOutputError(FileNotFoundError):
    """The stage a run starts from has not exported its weights."""


class WrongStageOutputError(ValueError):
    """``run.init_from`` holds weights of a kind the stage cannot start from."""


class DamagedExportError(MissingStageOutputError):
    """A complete-marked export whose files no longer match the sizes and hashes its marker records."""


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
        DamagedExportError: a file of the export differs from its marker (the message names it).
        WrongStageOutputError: a report-generator export (sft/ppo) given to a stage that starts from a vision
            encoder, or the reverse.
    """
    if init_from is None:
        return None
    if init_from in STAGES:
        path = verify_export(StageDirs(Path(run_root), init_from).export)
        if not (path / EXPORT_MARKER).is_file():
            raise MissingStageOutputError(
                f"stage '{stage}' starts from the '{init_from}' export, but {path} has no complete export "
                f"({EXPORT_MARKER} missing): run stages/{init_from}.py with the same run.run_root first, "
                "or set run.init_from to a directory or null"
            )
    else:
        path = verify_export(Path(init_from))
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


def _read_yaml(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, yaml.YAMLError):
        data = yaml.safe_load(path.read_text())
        return data if isinstance(data, dict) else {}
    return {}


def _lineage(stage_dir: Path, stage: str, seen: frozenset[Path] = frozenset()) -> list[dict[str, Any]]:
    """The stages that made the export of ``stage_dir``, oldest first, from the configs of the run root; a stage
    starting from an export that records its lineage takes that record instead of reading further."""
    run_root = stage_dir.parent
    config = _read_yaml(stage_dir / "config.yaml")
    entry = {"stage": stage, "config": portable(config, run_root) if config else None}
    init = (config.get("run") or {}).get("init_from") if config else None
    if init is None:
        return [entry]
    source = StageDirs(run_root, init).export if init in STAGES else Path(init)
    recorded = read_marker(source).get("lineage")
    if recorded is not None:
        return [*recorded, entry]
    if init in STAGES and stage_dir not in seen and (run_root / init / "config.yaml").is_file():
        return [*_lineage(run_root / init, init, seen | {stage_dir}), entry]
    # Weights of unknown history (a folder without a recorded lineage): named, so the gap shows.
    return [{"stage": None, "config": None, "source": portable(str(source.resolve()), run_root)}, entry]


def recorded_lineage(export_dir: Path) -> list[dict[str, Any]] | None:
    """``[{"stage", "config"}, ...]`` (oldest first, configs portable; weights of unknown history have stage None
    and a ``source``) as the export records it; None for exports marked before markers recorded it."""
    return read_marker(export_dir).get("lineage")


def export_lineage(export_dir: Path) -> list[dict[str, Any]]:
    """The recorded lineage, else the one the configs of the export's run root describe now (an export being
    written, or one marked before markers recorded it); empty outside a run root."""
    recorded = recorded_lineage(export_dir)
    if recorded is not None:
        return recorded
    stage_dir = Path(export_dir).parent
    return _lineage(stage_dir, stage_dir.name) if stage_dir.name in STAGES else []


def mark_export_complete(export_dir: Path, info: Mapping[str, Any]) -> None:
    """Written last, so a crash mid-export never looks like a finished hand-off.

    The marker holds ``info`` and the export's lineage (``<run_root>/<stage>/config.yaml`` beside the export and the
    stages before it), paths made portable, plus the files' sizes and hashes (:func:`write_marker`).
    """
    export_dir = Path(export_dir)
    stage_dir = export_dir.parent
    stage = str(info.get("stage", stage_dir.name))
    record = {**portable(info, stage_dir.parent), "lineage": _lineage(stage_dir, stage)}
    write_marker(export_dir, record)


def _set_aside(export_dir: Path) -> tuple[Path, Path]:
    """The new export while it is written, and the previous one while the new one takes its place."""
    return export_dir.with_name(f".tmp_{export_dir.name}"), export_dir.with_name(f".old_{export_dir.name}")


def recover_export(export_dir: Path) -> None:
    """Puts back an export that a crash inside :func:`writing_export`'s swap left aside: when ``export_dir`` is
    missing, its complete new copy (``.tmp_``) or else its complete previous one (``.old_``) takes its place."""
    if export_dir.exists():
        return
    for candidate in _set_aside(export_dir):
        if (candidate / EXPORT_MARKER).is_file():
            # Several processes may resolve the same export at once; the first rename wins, the others find it done.
            with contextlib.suppress(OSError):
                candidate.rename(export_dir)
            return


def verify_export(export_dir: Path) -> Path:
    """``export_dir``, put back first if a crash left it aside, checked against the sizes and hashes its marker
    records (folders without a marker, and exports marked before markers recorded files, are taken as they are).

    Raises:
        DamagedExportError: naming the export and the file.
    """
    export_dir = Path(export_dir)
    recover_export(export_dir)
    problem = export_problem(export_dir)
    if problem is not None:
        raise DamagedExportError(f"export {export_dir} is damaged: {problem}; rerun the stage that wrote it "
                                 "(or restore the file)")
    return export_dir


@contextlib.contextmanager
def writing_export(export_dir: Path, info: Mapping[str, Any]) -> Iterator[Path]:
    """Yields an empty temporary folder to write an export into; on success the marker goes in last and the
    folder replaces ``export_dir``. An export interrupted at any point (re-exports included) leaves a complete
    export, never a marker beside partial weights: the previous one, or after a crash between the two renames of the
    swap, the new one, put back by the next call or by :func:`verify_export` (:func:`recover_export`).

    Args:
        export_dir: final location (``StageDirs.export``).
        info: the writer's keys of the completion marker.

    Raises:
        ExportLeakError: a file would carry an absolute path, a user/host name or reports nobody asked for (the
            previous export stays in place).
    """
    export_dir = Path(export_dir)
    tmp, old = _set_aside(export_dir)
    recover_export(export_dir)
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    yield tmp
    scrub_model_paths(tmp)
    leaks = find_leaks(tmp)
    if leaks:
        raise ExportLeakError(f"the export to {export_dir} would carry " + "; ".join(leaks))
    mark_export_complete(tmp, info)
    if export_dir.exists():
        export_dir.rename(old)
    tmp.rename(export_dir)
    if old.exists():
        shutil.rmtree(old)
