"""OptimConfig validation (settings that would silently train wrong are refused with the key named) and the
optimizer's parameter groups."""

import pytest
from torch import nn

from rlhf_rrg.config import ConfigError, load_config
from rlhf_rrg.optim import OptimConfig, build_optimizer, build_scheduler, learning_rates, lr_factor, module_prefix


@pytest.mark.parametrize(("key", "value"), [("weight_decay", "-0.01"), ("grad_clip", "-1.0"), ("lr", "0")])
def test_negative_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"optim\.{key} must be"):
        load_config(OptimConfig, overrides=[f"--{key}", value])


def test_zero_weight_decay_and_disabled_clipping_are_valid():
    cfg = OptimConfig(weight_decay=0.0, grad_clip=0.0)
    assert (cfg.weight_decay, cfg.grad_clip) == (0.0, 0.0)


def test_lr_scales_give_prefixed_parameters_their_own_rate_and_keep_decay_groups():
    model = nn.ModuleDict({"body": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1), {"head.": 10.0})
    rates = {(g["lr"], g["weight_decay"]): sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}
    # weights decay, biases do not; the head's parameters run at 10x.
    assert rates == {(1e-3, 0.1): 16, (1e-3, 0.0): 4, (1e-2, 0.1): 8, (1e-2, 0.0): 2}


def test_module_prefix_scales_a_wrapped_submodule_and_nothing_else():
    encoder = nn.Linear(4, 4)
    model = nn.ModuleDict({"wrapper": nn.Sequential(encoder), "head": nn.Linear(4, 2)})
    assert module_prefix(model, encoder) == "wrapper.0."
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3), {module_prefix(model, encoder): 0.1})
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert [lrs[id(p)] for p in encoder.parameters()] == [pytest.approx(1e-4)] * 2
    assert [lrs[id(p)] for p in model["head"].parameters()] == [1e-3] * 2


def test_module_prefix_of_a_foreign_module_is_an_error():
    with pytest.raises(ValueError, match="Linear is not a submodule of Sequential"):
        module_prefix(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig())



def test_learning_rates_log_the_base_rate_and_each_scaled_group_whatever_comes_first():
    # The scaled tower's parameters come first, as the vision tower's do in a report generator.
    model = nn.ModuleDict({"tower": nn.Linear(4, 4), "llm": nn.Linear(4, 2)})
    cfg = OptimConfig(lr=1e-3, schedule="linear", warmup_steps=0)
    optimizer = build_optimizer(model, cfg, {"tower.": 0.1})
    scheduler = build_scheduler(optimizer, cfg, 4)
    optimizer.step()
    scheduler.step()
    assert learning_rates(optimizer) == pytest.approx({"train/lr": 1e-3 * lr_factor(1, 4, cfg),
                                                       "train/lr/tower": 1e-4 * lr_factor(1, 4, cfg)})
    assert learning_rates(build_optimizer(model, cfg)) == {"train/lr": 1e-3}
