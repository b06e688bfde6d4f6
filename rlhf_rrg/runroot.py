"""Stage hand-off by name under one run root: ``<run_root>/<stage>/{export,checkpoints,metrics.jsonl}``.

Resume (optimizer, RNG, step) lives in ``checkpoints/`` and is only read by the same stage; the next stage
reads ``export/`` (weights + resolved config), never another stage's optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGES: tuple[str, ...] = ("pretrain", "align", "sft", "ppo")
EXPORT_MARKER = "export_complete.json"


class MissingStageOutputError(FileNotFoundError):
    """The stage a run starts from has not exported its weights."""


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
    """
    if init_from is None:
        return None
    if init_from in STAGES:
        export = StageDirs(Path(run_root), init_from).export
        if not (export / EXPORT_MARKER).is_file():
            raise MissingStageOutputError(
                f"stage '{stage}' starts from the '{init_from}' export, but {export} has no complete export "
                f"({EXPORT_MARKER} missing): run stages/{init_from}.py with the same run.run_root first, "
                "or set run.init_from to a directory or null"
            )
        return export
    path = Path(init_from)
    if not path.is_dir():
        raise MissingStageOutputError(f"stage '{stage}': run.init_from={init_from!r} is neither a stage name "
                                      f"{list(STAGES)} nor an existing directory")
    return path


def mark_export_complete(export_dir: Path, info: dict) -> None:
    """Written last, so a crash mid-export never looks like a finished hand-off."""
    import json

    (export_dir / EXPORT_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True))
