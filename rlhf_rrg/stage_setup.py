"""What every stage does before its first step: accelerator, seed, run-root folders, config dump, loggers."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from rlhf_rrg.checkpoint import latest_step
from rlhf_rrg.config import save_config, to_dict
from rlhf_rrg.distributed import seed_everything
from rlhf_rrg.logging import BACKEND_PACKAGES, BACKENDS, TRACKING_EXTRA, MetricLogger, build_loggers
from rlhf_rrg.runroot import StageDirs


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


def setup_stage(stage: str, cfg: Any, run: RunConfig, grad_accum: int = 1, resume: bool = True) -> StageContext:
    """Creates the accelerator (launch settings come from ``accelerate launch``), seeds every RNG, writes
    ``<run_root>/<stage>/config.yaml`` and opens the metric loggers on the main process.

    When resuming, metric records logged after the checkpoint being resumed are dropped, so ``metrics.jsonl``
    reads as one uninterrupted run."""
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum)
    seed_everything(run.seed)
    dirs = StageDirs(Path(run.run_root), stage)
    if accelerator.is_main_process:
        dirs.make()
        save_config(cfg, dirs.config)
    accelerator.wait_for_everyone()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    for name in ("rlhf_rrg", "rewards"):
        logging.getLogger(name).setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    drop_after = latest_step(dirs.checkpoints) if resume else None
    metric_logger = build_loggers(dirs.root, run.loggers, accelerator.is_main_process,
                                  drop_after_step=drop_after if drop_after is not None else (0 if resume else None),
                                  wandb_project=run.project,
                                  run_name=run.run_name or f"{Path(run.run_root).name}-{stage}")
    metric_logger.log_config(to_dict(cfg))
    return StageContext(accelerator=accelerator, dirs=dirs, metric_logger=metric_logger)
