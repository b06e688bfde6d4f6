"""OptimConfig validation: settings that would silently train wrong are refused with the key named."""

import pytest

from rlhf_rrg.config import ConfigError, load_config
from rlhf_rrg.optim import OptimConfig


@pytest.mark.parametrize(("key", "value"), [("weight_decay", "-0.01"), ("grad_clip", "-1.0"), ("lr", "0")])
def test_negative_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"optim\.{key} must be"):
        load_config(OptimConfig, overrides=[f"--{key}", value])


def test_zero_weight_decay_and_disabled_clipping_are_valid():
    cfg = OptimConfig(weight_decay=0.0, grad_clip=0.0)
    assert (cfg.weight_decay, cfg.grad_clip) == (0.0, 0.0)
