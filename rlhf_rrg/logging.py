"""Metric loggers behind one Protocol: JSONL (always on), TensorBoard and Weights & Biases (optional), and a null
object for non-main ranks.

Modelled on torchtune ``training/metric_logging.py`` (``MetricLoggerInterface``) and lingua ``metrics.py``
(``metrics.jsonl``). Keys are flat and namespaced (``train/loss``, ``rollout/kl``, ``reward/radgraph``); tests and
golden-loss checks read ``metrics.jsonl`` back with :func:`read_jsonl`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

logger = logging.getLogger(__name__)

Scalar = int | float | bool | str
BACKENDS: tuple[str, ...] = ("jsonl", "tensorboard", "wandb")
# The optional backends' packages, and how to install them with the package.
BACKEND_PACKAGES: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb"}
TRACKING_EXTRA = "or all trackers: pip install -e '.[tracking]'"


class MetricLogger(Protocol):
    """Receives flat ``{name: scalar}`` metrics at integer steps and the resolved run config."""

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None: ...

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def _to_scalar(key: str, value: Any) -> Scalar:
    """Converts one-element tensors and numpy scalars to Python scalars; rejects anything else non-scalar."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {key!r}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"metric {key!r}: expected a number or string, got {type(value).__name__}")


def _scalars(payload: Mapping[str, Any]) -> dict[str, Scalar]:
    if "step" in payload:
        raise ValueError("metric payload must not contain 'step'; pass it as the step argument")
    return {key: _to_scalar(key, value) for key, value in payload.items()}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Reads a JSON-lines file into a list of dicts, skipping blank lines.

    Raises:
        ValueError: Naming the file and line of a malformed record.
    """
    path = Path(path)
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return records


class JsonlLogger:
    """Appends one JSON object per :meth:`log_dict` call (``{"step": N, ...}``) to ``path``.

    Append mode lets a resumed run continue the same file. A run that crashed after logging past its last
    checkpoint would then repeat those steps; ``drop_after_step`` (the resumed checkpoint's step) removes
    the stale records first, so the file reads as one uninterrupted run.

    Args:
        path: The ``metrics.jsonl`` file; parent folders are created.
        drop_after_step: If set, records with ``step`` greater than this are removed from an existing file.
        config_path: Where :meth:`log_config` writes the config as JSON; defaults to ``config.json`` next to
            ``path``.
    """

    def __init__(
        self, path: str | Path, drop_after_step: int | None = None, config_path: str | Path | None = None
    ) -> None:
        self.path = Path(path)
        self.config_path = Path(config_path) if config_path is not None else self.path.with_name("config.json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if drop_after_step is not None and self.path.exists():
            self._truncate(drop_after_step)
        self._file = self.path.open("a", encoding="utf-8")

    def _truncate(self, last_step: int) -> None:
        records = read_jsonl(self.path)
        kept = [r for r in records if r.get("step", last_step) <= last_step]
        if len(kept) != len(records):
            logger.info("%s: dropping %d records after step %d", self.path, len(records) - len(kept), last_step)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        record = {"step": int(step), **_scalars(payload)}
        self._file.write(json.dumps(record) + "\n")
        # Flush every record: a crashed run must still leave its metrics on disk.
        self._file.flush()

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.config_path.write_text(json.dumps(dict(config), indent=2, default=str) + "\n", encoding="utf-8")

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    """Writes numeric metrics as scalars and strings as text to a TensorBoard event folder.

    Args:
        log_dir: Event-file folder.

    Raises:
        ImportError: If ``torch.utils.tensorboard`` (the ``tensorboard`` package) is not installed.
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("the 'tensorboard' logging backend needs `pip install tensorboard` "
                              f"({TRACKING_EXTRA})") from err
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        for key, value in _scalars(payload).items():
            if isinstance(value, str):
                self._writer.add_text(key, value, global_step=step)
            else:
                self._writer.add_scalar(key, value, global_step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        # Indented by four spaces so TensorBoard's markdown renders it as a code block.
        text = json.dumps(dict(config), indent=2, default=str)
        self._writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """Logs to Weights & Biases; a resumed run in the same ``out_dir`` continues the same W&B run.

    The run id is kept in ``out_dir/wandb_run_id`` and passed back with ``resume="allow"``. Credentials and
    mode (e.g. ``WANDB_MODE=offline``) come from wandb's own environment variables.

    Args:
        out_dir: Run folder (wandb files go under it).
        project: W&B project; ``None`` lets wandb use ``WANDB_PROJECT``.
        run_name: Display name of the run.

    Raises:
        ImportError: If ``wandb`` is not installed.
    """

    def __init__(self, out_dir: str | Path, project: str | None = None, run_name: str | None = None) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ImportError(f"the 'wandb' logging backend needs `pip install wandb` ({TRACKING_EXTRA})") from err
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        self._run = wandb.init(project=project, name=run_name, dir=str(out_dir), id=run_id, resume="allow")
        id_file.write_text(self._run.id)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        self._run.log(_scalars(payload), step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._run.config.update(dict(config), allow_val_change=True)

    def close(self) -> None:
        self._run.finish()


class NullLogger:
    """Discards everything: what non-main ranks, and runs with logging off, get."""

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        """Does nothing."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Does nothing."""

    def close(self) -> None:
        """Does nothing."""


class MultiLogger:
    """Forwards every call to each of ``loggers`` in order."""

    def __init__(self, loggers: Sequence[MetricLogger]) -> None:
        self.loggers = list(loggers)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        for each in self.loggers:
            each.log_dict(payload, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        for each in self.loggers:
            each.log_config(config)

    def close(self) -> None:
        for each in self.loggers:
            each.close()


def build_loggers(
    out_dir: str | Path,
    backends: Sequence[str],
    is_main: bool,
    *,
    drop_after_step: int | None = None,
    wandb_project: str | None = None,
    run_name: str | None = None,
) -> MetricLogger:
    """Builds the run's metric logger: the named backends on the main process, a :class:`NullLogger` elsewhere.

    Backend names are checked on every rank, so a typo fails everywhere rather than only on rank 0.

    Args:
        out_dir: Stage output folder; ``jsonl`` writes ``metrics.jsonl`` (+ ``config.json``), ``tensorboard``
            writes under ``tensorboard/``, ``wandb`` under ``wandb/``.
        backends: Any of ``"jsonl"``, ``"tensorboard"``, ``"wandb"``, each at most once.
        is_main: Whether this process is the main (rank 0) process.
        drop_after_step: On resume, the checkpoint step: later JSONL records are dropped (see
            :class:`JsonlLogger`).
        wandb_project: W&B project for the ``wandb`` backend.
        run_name: Run display name for the ``wandb`` backend.

    Returns:
        A :class:`MultiLogger` over the backends, or a :class:`NullLogger`.
    """
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown logging backend(s) {unknown}; choose from {list(BACKENDS)}")
    if len(set(backends)) != len(backends):
        raise ValueError(f"logging backends must not repeat, got {list(backends)}")
    if not is_main:
        return NullLogger()
    out_dir = Path(out_dir)
    loggers: list[MetricLogger] = []
    for name in backends:
        if name == "jsonl":
            loggers.append(JsonlLogger(out_dir / "metrics.jsonl", drop_after_step=drop_after_step))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(out_dir / "tensorboard"))
        else:
            loggers.append(WandbLogger(out_dir, project=wandb_project, run_name=run_name))
    return MultiLogger(loggers)
