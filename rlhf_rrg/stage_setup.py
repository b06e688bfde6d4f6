"""What every stage does before its first step: accelerator, seed, stage-folder lock and checks, config, loggers;
and its entry point, which reports user errors in one line.

Under ``accelerate launch`` a stage runs as the launcher's child process, and accelerate 1.15's launcher raises
(and prints the traceback of) a ``CalledProcessError`` for any nonzero exit of its child, the child's stderr tail
included, unless it is started with ``--quiet`` (torchrun-based launches likewise print their ``ChildFailedError``):
nothing a child does changes that. So a stage exits with its one line and status 2, and the scripts and the stage
docstrings launch with ``accelerate launch --quiet``: it streams the child's output, adds nothing of its own and
exits with status 1.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from rewards.weights import WeightsNotFoundError
from rlhf_rrg.checkpoint import CheckpointError, latest_step, select_valid_checkpoint
from rlhf_rrg.config import ConfigError, parse_stage_args, save_config, to_dict
from rlhf_rrg.data.annotation import DataError
from rlhf_rrg.distributed import build_accelerator, check_world_size, seed_everything, zero_offload, zero_stage
from rlhf_rrg.logging import BACKEND_PACKAGES, BACKENDS, TRACKING_EXTRA, MetricLogger, build_loggers
from rlhf_rrg.numerics import numerics_line
from rlhf_rrg.runlock import LOCK_NAME, RunLock, RunLockedError, exit_with_parent
from rlhf_rrg.runroot import MissingStageOutputError, StageDirs, WrongStageOutputError

T = TypeVar("T")

# Restored from the checkpoint (optimizer param groups, scheduler base lrs) whatever the config says, so a resume
# that changes them would silently train with the old values: refused instead.
FIXED_ON_RESUME: tuple[str, ...] = ("lr", "weight_decay", "betas", "eps")


class StageFolderError(RuntimeError):
    """The stage folder holds another run's outputs, or settings a resume cannot apply."""


# Errors the user fixes by changing the command, the inputs or the run root, each message saying what: no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, DataError, MissingStageOutputError, WrongStageOutputError, StageFolderError, RunLockedError,
    CheckpointError, WeightsNotFoundError,
)


def run_stage(main: Callable[[T], None], cls: type[T], description: str | None) -> None:
    """A stage script's entry point: ``main`` on the command line parsed as ``cls`` (:func:`parse_stage_args`).

    A user error (:data:`USER_ERRORS`), at parse time or once the stage runs, prints ``<script>: error: <message>``
    on stderr and exits with status 2, argparse's usage status; anything else keeps its traceback (a bug). A stage
    that ends normally destroys its process group: gloo's worker threads left alive at interpreter shutdown can
    abort a finished rank ("terminate called without an active exception", pytorch/pytorch#190489), which failed a
    resumed ZeRO-3 run on CPU once.
    """
    cfg = parse_stage_args(cls, description)
    try:
        main(cfg)
    except USER_ERRORS as err:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {err}\n")
        raise SystemExit(2) from None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def installed(package: str) -> bool:
    """Whether ``package`` can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


@dataclass
class RunConfig:
    run_root: str = field(default="runs/demo", metadata={"help": "root folder shared by all stages of a run"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order and sampling"})
    init_from: str | None = field(default=None, metadata={"help": "stage name or folder with starting weights"})
    loggers: list[str] = field(default_factory=lambda: ["jsonl"], metadata={
        "help": "any of jsonl, tensorboard, wandb (the last two: pip install -e '.[tracking]')"})
    project: str = field(default="rlhf-rrg", metadata={"help": "W&B project of the run"})
    run_name: str | None = field(default=None, metadata={
        "help": "W&B run name; None: '<run_root folder name>-<stage>'"})
    overwrite: bool = field(default=False, metadata={
        "help": "delete this stage's folder (checkpoints, metrics, export) before starting; needed to start over "
                "with checkpoint.resume false on a used run root"})

    def __post_init__(self) -> None:
        if not self.run_root:
            raise ValueError("run.run_root must be a non-empty path")
        unknown = [name for name in self.loggers if name not in BACKENDS]
        if unknown:
            raise ValueError(f"run.loggers: unknown backend(s) {unknown}; choose from {list(BACKENDS)}")
        # A missing tracker fails at parse time, not after the models are built.
        absent = [name for name in self.loggers if name in BACKEND_PACKAGES and not installed(BACKEND_PACKAGES[name])]
        if absent:
            raise ValueError(f"run.loggers names {absent} but the package is not installed: "
                             f"pip install {' '.join(BACKEND_PACKAGES[n] for n in absent)} ({TRACKING_EXTRA})")


@dataclass
class StageContext:
    accelerator: Accelerator
    dirs: StageDirs
    metric_logger: MetricLogger


def _check_resume_settings(dirs: StageDirs, cfg: Any) -> None:
    """Refuses a resume whose optimiser settings differ from the run's (``config.yaml`` of the checkpointed run)."""
    if not dirs.config.is_file() or not hasattr(cfg, "optim"):
        return
    before = (yaml.safe_load(dirs.config.read_text()) or {}).get("optim", {})
    now = to_dict(cfg)["optim"]
    changed = [f"optim.{k}: {before[k]!r} -> {now[k]!r}"
               for k in FIXED_ON_RESUME if k in before and before[k] != now[k]]
    if changed:
        raise StageFolderError(
            f"{dirs.root}: refusing to resume with changed optimiser settings ({', '.join(changed)}): the checkpoint "
            "restores its own values, so the new ones would be ignored. Resume with the old values, or start over "
            "with --run.overwrite true (or another run.run_root)")


def prepare_stage_folder(dirs: StageDirs, cfg: Any, run: RunConfig, resume: bool) -> int | None:
    """Main process: locks the stage folder, clears or checks it, validates checkpoints and writes ``config.yaml``.

    Returns:
        The step of the checkpoint a resume will load (None when there is none).

    Raises:
        RunLockedError: another live process holds the folder.
        StageFolderError: ``resume`` is off on a used folder without ``run.overwrite``, or resume settings changed.
        CheckpointError: no checkpoint is valid (each damaged file is named).
    """
    lock = RunLock(dirs.make().root).acquire()
    atexit.register(lock.release)
    if run.overwrite:
        for path in dirs.root.iterdir():
            if path.name != LOCK_NAME:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    used = [p for p in (dirs.checkpoints, dirs.metrics, dirs.export) if p.exists()]
    if not resume and used:
        raise StageFolderError(f"checkpoint.resume is false but {dirs.root} holds an earlier run ({used[0]}): pass "
                               "--run.overwrite true to delete it first, or pick another run.run_root")
    step = None
    if resume and select_valid_checkpoint(dirs.checkpoints) is not None:
        _check_resume_settings(dirs, cfg)
        step = latest_step(dirs.checkpoints)
    save_config(cfg, dirs.config)
    return step


def setup_stage(stage: str, cfg: Any, run: RunConfig, grad_accum: int = 1, resume: bool = True) -> StageContext:
    """Creates the accelerator (launch settings come from ``accelerate launch``), seeds every RNG, prepares the
    stage folder (:func:`prepare_stage_folder`), opens the metric loggers on the main process and logs
    ``run/num_processes``, ``run/zero_stage`` (0 without DeepSpeed), whether ZeRO offloads optimizer state and
    parameters (``run/offload_optimizer``, ``run/offload_param``: 0 or 1) and what decides its floating-point results
    on this machine (``run/numerics``, :func:`rlhf_rrg.numerics.numerics_line`).

    When resuming, metric records logged after the checkpoint being resumed are dropped, so ``metrics.jsonl``
    reads as one uninterrupted run."""
    accelerator = build_accelerator(gradient_accumulation_steps=grad_accum)
    exit_with_parent()
    check_world_size(accelerator.num_processes)
    seed_everything(run.seed)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    for name in ("rlhf_rrg", "rewards"):
        logging.getLogger(name).setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    dirs = StageDirs(Path(run.run_root), stage)
    resume_step, error, failure = None, None, [None]
    if accelerator.is_main_process:
        try:
            resume_step = prepare_stage_folder(dirs, cfg, run, resume)
        except Exception as err:
            error, failure[0] = err, f"{type(err).__name__}: {err}"
    if accelerator.num_processes > 1:
        broadcast_object_list(failure)  # also the barrier: no process reads the folder before it is ready
    if error is not None:
        raise error
    if failure[0] is not None:
        raise StageFolderError(f"the main process could not set up {dirs.root}: {failure[0]}")
    drop_after = resume_step if resume_step is not None else (0 if resume else None)
    metric_logger = build_loggers(dirs.root, run.loggers, accelerator.is_main_process, drop_after_step=drop_after,
                                  wandb_project=run.project,
                                  run_name=run.run_name or f"{Path(run.run_root).name}-{stage}")
    metric_logger.log_config(to_dict(cfg))
    # Multi-process tests read the world size back from here: a launch that silently ran one process must fail.
    # Likewise the ZeRO stage and its offload: a DeepSpeed launch that silently fell back to DDP, or to no offload,
    # must fail.
    offload_optimizer, offload_param = zero_offload(accelerator)
    metric_logger.log_dict({"run/num_processes": accelerator.num_processes, "run/zero_stage": zero_stage(accelerator),
                            "run/offload_optimizer": int(offload_optimizer), "run/offload_param": int(offload_param),
                            "run/numerics": numerics_line()},
                           drop_after or 0)
    return StageContext(accelerator=accelerator, dirs=dirs, metric_logger=metric_logger)
