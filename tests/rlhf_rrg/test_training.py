"""The shared loop on a tiny regression model: accumulation, batch order, resume, model selection, NaN stop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import Dataset

from rlhf_rrg.checkpoint import CheckpointConfig, checkpoint_problem
from rlhf_rrg.optim import OptimConfig, build_optimizer, build_scheduler, lr_factor
from rlhf_rrg.runroot import StageDirs
from rlhf_rrg.training import EpochBatchSampler, NonFiniteLossError, TrainConfig, TrainState, fit, make_train_loader

N_SAMPLES = 12


class Regression(Dataset):
    """y = x @ w_true + noise, fixed by seed."""

    def __init__(self, n: int = N_SAMPLES) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


class Net(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 8)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.tanh(self.hidden(x)))).squeeze(-1)


def mse_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    return nn.functional.mse_loss(model(batch["x"]), batch["y"]), {}


class RecordingLogger:
    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, Any]]] = []

    def log_dict(self, payload: dict[str, Any], step: int) -> None:
        self.records.append((step, dict(payload)))

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def series(self, key: str) -> list[float]:
        return [p[key] for _, p in self.records if key in p]


def run_fit(
    root: Path,
    *,
    batch_size: int = 4,
    grad_accum: int = 1,
    max_steps: int = 6,
    dropout: float = 0.0,
    step_fn: Callable = mse_step,
    ckpt: CheckpointConfig | None = None,
    eval_fn: Callable | None = None,
    export_fn: Callable | None = None,
    prepare_scheduler: bool = False,
    **train_kwargs: Any,
) -> tuple[Net, TrainState, RecordingLogger]:
    """Builds everything from seed 0, like a fresh process would, and runs ``fit``."""
    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, cpu=True)
    model = Net(dropout)
    optim_cfg = OptimConfig(lr=0.05, weight_decay=0.0, warmup_steps=2, grad_clip=0.0)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, max_steps)
    loader = make_train_loader(Regression(), batch_size, seed=3, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if prepare_scheduler:
        scheduler = accelerator.prepare(scheduler)
    logger = RecordingLogger()
    train_cfg = TrainConfig(
        max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, log_every=1, **train_kwargs
    )
    state = fit(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        step_fn=step_fn,
        train_cfg=train_cfg,
        optim_cfg=optim_cfg,
        ckpt_cfg=ckpt or CheckpointConfig(),
        dirs=StageDirs(root, "unit").make(),
        metric_logger=logger,
        eval_fn=eval_fn,
        export_fn=export_fn,
    )
    return accelerator.unwrap_model(model), state, logger


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_grad_accumulation_1x4_equals_4x1(tmp_path):
    whole, _, _ = run_fit(tmp_path / "whole", batch_size=4, grad_accum=1)
    accumulated, state, _ = run_fit(tmp_path / "accum", batch_size=1, grad_accum=4)
    assert state.step == 6
    assert_same_weights(whole, accumulated)
    # The comparison can fail: a different micro-batch split of the same data gives other weights.
    split_differently, _, _ = run_fit(tmp_path / "two", batch_size=2, grad_accum=1, max_steps=12)
    with pytest.raises(AssertionError):
        assert_same_weights(whole, split_differently)


def test_lr_follows_the_schedule_once_per_optimizer_step_under_accumulation(tmp_path):
    _, _, logger = run_fit(tmp_path, batch_size=1, grad_accum=4)
    cfg = OptimConfig(lr=0.05, weight_decay=0.0, warmup_steps=2, grad_clip=0.0)
    # train/lr is logged after the step's update: the rate the next step will use.
    assert logger.series("train/lr") == pytest.approx([0.05 * lr_factor(s, 6, cfg) for s in range(1, 7)])


def test_a_prepared_scheduler_is_refused(tmp_path):
    # accelerate steps a prepared scheduler num_processes times per optimizer step: N processes, N x too fast.
    with pytest.raises(TypeError, match="unprepared"):
        run_fit(tmp_path, prepare_scheduler=True)


def test_epoch_batch_sampler_order_depends_only_on_seed_and_epoch():
    data = Regression(10)

    def batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = EpochBatchSampler(data, 3, seed)
        sampler.set_epoch(epoch)
        torch.rand(7)  # global RNG use in between must not matter
        return list(sampler)

    first = batches(1, 0)
    assert first == batches(1, 0)
    assert len(first) == 3 and all(len(b) == 3 for b in first)  # ragged tail dropped
    assert len({i for b in first for i in b}) == 9
    assert first != batches(1, 1) and first != batches(2, 0)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(1 + 4)).tolist()[:9]
    assert [i for b in batches(1, 4) for i in b] == expected
    with pytest.raises(ValueError, match="batch_size=11"):
        EpochBatchSampler(data, 11, 0)


def test_stop_at_step_then_resume_equals_straight_run(tmp_path):
    # Dropout and a shuffled order that spans epochs: both RNG and sampler position must be restored.
    common = {"batch_size": 4, "max_steps": 7, "dropout": 0.3}
    straight, _, straight_log = run_fit(tmp_path / "straight", **common)
    _, stopped, first_log = run_fit(tmp_path / "resumed", stop_at_step=4, **common)
    assert stopped.step == 4 and stopped.epoch == 1 and stopped.batch_in_epoch == 1
    resumed, state, second_log = run_fit(tmp_path / "resumed", **common)
    assert state.step == 7
    assert_same_weights(straight, resumed)
    losses = first_log.series("train/loss") + second_log.series("train/loss")
    torch.testing.assert_close(losses, straight_log.series("train/loss"), rtol=1e-6, atol=1e-7)


def test_select_metric_exports_the_best_evaluation(tmp_path):
    scripted = iter([0.2, 0.9, 0.5])  # evaluations at steps 2, 4 and the end (6)
    exported: list[tuple[int, torch.Tensor]] = []
    steps_seen: list[int] = []

    def eval_fn(model: nn.Module) -> dict[str, float]:
        steps_seen.append(len(steps_seen))
        return {"score": next(scripted), "other": 0.0}

    def export_fn(model: nn.Module) -> None:
        exported.append((len(steps_seen), model.out.weight.detach().clone()))

    model, state, log = run_fit(tmp_path, eval_every=2, select_metric="score", eval_fn=eval_fn, export_fn=export_fn)
    assert state.best_metric == 0.9 and state.best_step == 4
    # Exported after the first evaluation (step 2) and the best (step 4), not after the worse final one.
    assert [n for n, _ in exported] == [1, 2]
    assert not torch.equal(exported[-1][1], model.out.weight)
    assert [s for s, p in log.records if "eval/score" in p] == [2, 4, 6]


def test_evaluations_do_not_change_training(tmp_path):
    # Dropout draws from the RNG every step; an evaluation that draws too (an eval loader's seed, sampling) must not
    # shift those draws, or train.eval_every would change the trained model.
    def eval_fn(model: nn.Module) -> dict[str, float]:
        return {"draw": torch.rand(()).item()}

    common = {"batch_size": 4, "max_steps": 6, "dropout": 0.3, "eval_fn": eval_fn}
    rarely, _, _ = run_fit(tmp_path / "rarely", eval_every=0, **common)
    often, _, log = run_fit(tmp_path / "often", eval_every=1, **common)
    assert len(log.series("eval/draw")) == 6
    assert_same_weights(rarely, often)


def test_select_mode_min_and_unknown_metric(tmp_path):
    scripted = iter([0.5, 0.1, 0.3])
    _, state, _ = run_fit(
        tmp_path / "min",
        eval_every=2,
        select_metric="loss",
        select_mode="min",
        eval_fn=lambda model: {"loss": next(scripted)},
    )
    assert (state.best_metric, state.best_step) == (0.1, 4)
    with pytest.raises(KeyError, match="'typo'.*available: \\['loss'\\]"):
        run_fit(tmp_path / "typo", select_metric="typo", eval_fn=lambda model: {"loss": 1.0})


def test_nonfinite_loss_raises_and_saves_the_failing_state(tmp_path):
    calls = {"n": 0}

    def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        calls["n"] += 1
        loss, metrics = mse_step(model, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2 .*state saved to"):
        run_fit(tmp_path, step_fn=step_fn, ckpt=CheckpointConfig(save_every=1))
    checkpoints = tmp_path / "unit" / "checkpoints"
    assert (checkpoints / "failed_step_000002").is_dir()
    assert (checkpoints / "step_000002").is_dir() and not (checkpoints / "step_000003").exists()


def test_an_ordinary_exception_in_a_step_saves_the_failing_state(tmp_path):
    calls = {"n": 0}

    def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        calls["n"] += 1
        if calls["n"] == 4:
            raise ValueError("user code failed")
        return mse_step(model, batch)

    with pytest.raises(ValueError, match=r"user code failed; unit step 3: state saved to .*failed_step_000003; the "
                                         r"last good checkpoint is .*step_000003"):
        run_fit(tmp_path, step_fn=step_fn, ckpt=CheckpointConfig(save_every=1))
    failed = tmp_path / "unit" / "checkpoints" / "failed_step_000003"
    assert checkpoint_problem(failed) is None and (failed / "model.safetensors").is_file()


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_resume_skips_a_damaged_checkpoint_and_still_equals_a_straight_run(tmp_path, caplog, damaged):
    # Dropout: a silently unrestored RNG (a truncated random_states_0.pkl) would change the weights.
    common = {"batch_size": 4, "max_steps": 7, "dropout": 0.3}
    straight, _, _ = run_fit(tmp_path / "straight", **common)
    ckpt = CheckpointConfig(save_every=2, keep=3)
    run_fit(tmp_path / "resumed", stop_at_step=5, ckpt=ckpt, **common)
    newest = tmp_path / "resumed" / "unit" / "checkpoints" / "step_000005"
    (newest / damaged).write_bytes((newest / damaged).read_bytes()[:10])
    resumed, state, log = run_fit(tmp_path / "resumed", ckpt=ckpt, **common)
    assert f"skipping damaged checkpoint {newest}" in caplog.text and damaged in caplog.text
    assert state.step == 7 and log.records[0][0] == 5  # resumed after step 4
    assert_same_weights(straight, resumed)
