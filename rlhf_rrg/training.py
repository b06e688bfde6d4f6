"""The supervised training loop shared by the pretrain, align and SFT stages.

A stage supplies ``step_fn(model, batch) -> (loss, metrics)`` and optionally ``eval_fn(model) -> metrics`` and
``export_fn(model)``; this module owns batching order, gradient accumulation, clipping, logging,
non-finite loss handling, checkpoint/resume and best-checkpoint export, so every stage resumes the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from rlhf_rrg.checkpoint import CheckpointConfig, CheckpointManager, TrainState
from rlhf_rrg.distributed import preserved_rng
from rlhf_rrg.logging import MetricLogger
from rlhf_rrg.optim import OptimConfig, learning_rates
from rlhf_rrg.runroot import StageDirs

logger = logging.getLogger(__name__)

StepFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]
ExportFn = Callable[[torch.nn.Module], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the failing state was saved for inspection."""


@dataclass
class TrainConfig:
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "micro-batch size per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    log_every: int = field(default=10, metadata={"help": "log train metrics every N steps"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps; 0 evaluates only at the end"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers"})
    stop_at_step: int = field(default=0, metadata={
        "help": "end this invocation after this step with a checkpoint, to be resumed later (wall-clock-limited "
                "jobs); 0 runs to max_steps"})
    select_metric: str | None = field(default=None, metadata={"help": "eval metric that picks the exported model"})
    select_mode: Literal["max", "min"] = field(default="max", metadata={"help": "max: higher select_metric is better"})
    balance_findings: float = field(default=0.0, metadata={
        "help": "finding-aware sampling: each training study is drawn with weight (count of its rarest CheXpert "
                "observation) ** -balance_findings (rlhf_rrg.data.sampling); 0 shuffles uniformly"})

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.balance_findings < 0:
            raise ValueError(f"train.balance_findings must be >= 0, got {self.balance_findings}")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every must be >= 0, got {self.eval_every}")


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches whose order depends only on (seed, epoch), so a resumed run sees the same batches.

    With ``weights`` ``(n,)`` an epoch is ``n`` draws with replacement in proportion to them instead of a permutation.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True,
                 weights: torch.Tensor | None = None) -> None:
        n = len(dataset)
        if n < batch_size:
            raise ValueError(f"dataset has {n} samples, fewer than train.batch_size={batch_size}")
        if weights is not None and tuple(weights.shape) != (n,):
            raise ValueError(f"weights must have shape ({n},) for {n} samples, got {tuple(weights.shape)}")
        self.dataset, self.n, self.batch_size, self.seed, self.shuffle = dataset, n, batch_size, seed, shuffle
        self.weights = weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator).tolist()
        elif self.shuffle:
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        # Drop the ragged tail: equal batch shapes keep DDP ranks and resume arithmetic simple.
        for i in range(len(self)):
            yield order[i * self.batch_size : (i + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.n // self.batch_size


def make_train_loader(dataset: Dataset, batch_size: int, seed: int, collate_fn: Callable, num_workers: int = 0,
                      weights: torch.Tensor | None = None):
    sampler = EpochBatchSampler(dataset, batch_size, seed, weights=weights)
    # Every new iterator draws a worker base seed; from the global RNG that would shift dropout after a resume
    # (the resumed run creates one more iterator than the straight one), so it comes from its own generator.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed))


def _epoch_sampler(loader: DataLoader) -> EpochBatchSampler:
    # Accelerate wraps the batch sampler once per process split; its set_epoch does not reach ours.
    obj: Any = loader
    for _ in range(4):
        obj = getattr(obj, "batch_sampler", None)
        if isinstance(obj, EpochBatchSampler):
            return obj
    raise TypeError("fit() needs a loader built by make_train_loader (an EpochBatchSampler)")


def resumable_batches(accelerator: Accelerator, loader: DataLoader, state: TrainState) -> Iterator[Any]:
    """Endless batches in (seed, epoch) order, starting where ``state`` left off.

    ``state.epoch`` / ``state.batch_in_epoch`` count what has been handed out, so a checkpoint taken after
    processing a batch resumes with the next one.
    """
    sampler = _epoch_sampler(loader)
    while True:
        sampler.set_epoch(state.epoch)
        if hasattr(loader, "set_epoch"):
            # Accelerate's loader re-sets the sampler's epoch from its own iteration count when iterated; that
            # count restarts at 0 in a resumed process, so keep it equal to the loop's epoch.
            loader.set_epoch(state.epoch)
        if hasattr(sampler.dataset, "set_epoch"):
            sampler.dataset.set_epoch(state.epoch, sampler.seed)
        batches = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for batch in batches:
            state.batch_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0


def _is_better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def fit(
    *,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: DataLoader,
    step_fn: StepFn,
    train_cfg: TrainConfig,
    optim_cfg: OptimConfig,
    ckpt_cfg: CheckpointConfig,
    dirs: StageDirs,
    metric_logger: MetricLogger,
    eval_fn: EvalFn | None = None,
    export_fn: ExportFn | None = None,
    state: TrainState | None = None,
) -> TrainState:
    """Trains ``model`` (already ``accelerator.prepare``-d together with optimizer and loader).

    ``scheduler`` must NOT go through ``accelerator.prepare``: accelerate steps a prepared scheduler once per
    process on every optimizer step, so with N processes the schedule would run N times too fast. ``fit`` steps
    it once per optimizer step that really happened and checkpoints it.

    Returns:
        The final ``TrainState`` (step, best metric and the step that produced the exported weights).
    """
    if isinstance(scheduler, AcceleratedScheduler):
        raise TypeError("fit() takes the scheduler unprepared: accelerate steps a prepared one num_processes times "
                        "per optimizer step; do not pass it to accelerator.prepare")
    state = state or TrainState()
    accelerator.register_for_checkpointing(state, scheduler)
    ckpt = CheckpointManager(accelerator, dirs.checkpoints, ckpt_cfg.keep)
    if ckpt_cfg.resume:
        ckpt.resume()

    def evaluate_and_export() -> None:
        with preserved_rng():
            metrics = eval_fn(model) if eval_fn is not None else {}
        if metrics:
            metric_logger.log_dict({f"eval/{k}": v for k, v in metrics.items()}, state.step)
        key = train_cfg.select_metric
        if key is not None and key not in metrics:
            raise KeyError(f"train.select_metric={key!r} is not an eval metric; available: {sorted(metrics)}")
        value = metrics[key] if key is not None else None
        if value is None or _is_better(value, state.best_metric, train_cfg.select_mode):
            state.best_metric, state.best_step = value, state.step
            if export_fn is not None:
                export_fn(accelerator.unwrap_model(model))

    progress = tqdm(total=train_cfg.max_steps, initial=state.step, disable=not accelerator.is_main_process,
                    desc=dirs.stage)
    window: dict[str, list[float]] = {}
    model.train()
    batches = resumable_batches(accelerator, loader, state)
    while state.step < train_cfg.max_steps:
        batch = next(batches)
        with accelerator.accumulate(model), ckpt.saving_state_on_error(state.step, dirs.stage, (NonFiniteLossError,)):
            loss, metrics = step_fn(model, batch)
            if not bool(torch.isfinite(accelerator.gather(loss.detach().reshape(1))).all()):
                raise NonFiniteLossError(
                    f"{dirs.stage}: loss is {loss.item()} at step {state.step} (epoch {state.epoch}, batch "
                    f"{state.batch_in_epoch}). Lower optim.lr or check the inputs of this batch"
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and optim_cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
            optimizer.step()
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        for key, value in {"loss": loss.item(), **metrics}.items():
            window.setdefault(key, []).append(float(value))
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        progress.update(1)
        if state.step % train_cfg.log_every == 0 or state.step == train_cfg.max_steps:
            payload = {f"train/{k}": sum(v) / len(v) for k, v in window.items()}
            payload = {k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item()
                       for k, v in payload.items()}
            payload |= learning_rates(optimizer)
            payload["train/epoch"] = state.epoch
            metric_logger.log_dict(payload, state.step)
            progress.set_postfix(loss=f"{payload['train/loss']:.4f}")
            window.clear()
        if train_cfg.eval_every and state.step % train_cfg.eval_every == 0 and state.step < train_cfg.max_steps:
            model.eval()
            evaluate_and_export()
            model.train()
        if ckpt_cfg.save_every and state.step % ckpt_cfg.save_every == 0:
            ckpt.save(state.step)
        if state.step == train_cfg.stop_at_step:
            progress.close()
            ckpt.save(state.step)
            return state
    progress.close()
    model.eval()
    evaluate_and_export()
    if ckpt.latest() is None or ckpt.latest().name != f"step_{state.step:06d}":
        ckpt.save(state.step)
    if state.best_metric is not None and math.isfinite(state.best_metric):
        logger.info("exported weights from step %d (%s=%.4f)", state.best_step, train_cfg.select_metric,
                    state.best_metric)
    return state
