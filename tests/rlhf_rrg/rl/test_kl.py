import math

import pytest
import torch

from rlhf_rrg.config import load_config
from rlhf_rrg.rl.kl import AdaptiveKLController, FixedKLController, KLConfig, build_kl_controller, kl_per_token

LOGP = torch.tensor([[-1.0, -2.0]])
REF = torch.tensor([[-1.5, -1.0]])  # log r = ref - logp = [-0.5, 1.0]


def test_estimators_by_hand():
    torch.testing.assert_close(kl_per_token(LOGP, REF, "k1"), torch.tensor([[0.5, -1.0]]))  # -log r
    torch.testing.assert_close(kl_per_token(LOGP, REF, "k2"), torch.tensor([[0.125, 0.5]]))  # (log r)^2 / 2
    # (r - 1) - log r: e^-0.5 - 1 + 0.5 = 0.106531; e - 1 - 1 = 0.718282
    expected = torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0]])
    torch.testing.assert_close(kl_per_token(LOGP, REF, "k3"), expected)


def test_k1_and_k3_are_unbiased_for_the_exact_kl():
    q = torch.tensor([0.5, 0.3, 0.2])
    p = torch.tensor([0.2, 0.3, 0.5])
    exact = float((q * (q / p).log()).sum())  # KL(q || p) = 0.274887
    samples = torch.multinomial(q, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logq, logp = q.log()[samples][None], p.log()[samples][None]
    for name in ("k1", "k3"):
        assert abs(kl_per_token(logq, logp, name).mean().item() - exact) < 0.01, name
    assert (kl_per_token(logq, logp, "k3") >= 0).all()


def test_unknown_estimator_and_shape_mismatch():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_per_token(LOGP, REF, "k4")
    with pytest.raises(ValueError, match="differ in shape"):
        kl_per_token(LOGP, REF[:, :1])


def test_adaptive_controller_update_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=6.6, n_steps=1000)  # e = 6.6/6 - 1 = 0.1 -> beta = 0.2 * (1 + 0.1 * 0.1) = 0.202
    assert ctl.value == pytest.approx(0.202)
    ctl.update(current_kl=30.0, n_steps=500)  # e = 4 clipped to 0.2 -> * (1 + 0.2 * 0.05) = * 1.01
    assert ctl.value == pytest.approx(0.20402)
    ctl.update(current_kl=0.0, n_steps=10000)  # e = -1 clipped to -0.2 -> * (1 - 0.2) = * 0.8
    assert ctl.value == pytest.approx(0.163216)


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=10**6)
    assert ctl.value == 0.05


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(9.0, 256)
    torch.save(ctl.state_dict(), tmp_path / "kl.pt")
    resumed = AdaptiveKLController(0.2, 6.0, 10000)
    resumed.load_state_dict(torch.load(tmp_path / "kl.pt", weights_only=True))
    for kl, n in [(3.0, 64), (7.5, 128)]:
        ctl.update(kl, n)
        resumed.update(kl, n)
    assert resumed.value == ctl.value
    fixed = FixedKLController(0.1)
    with pytest.raises(ValueError, match="kind 'adaptive', this controller is 'fixed'"):
        fixed.load_state_dict(ctl.state_dict())


def test_build_kl_controller():
    assert isinstance(build_kl_controller("fixed", 0.1), FixedKLController)
    adaptive = build_kl_controller("adaptive", 0.1, target=6.0, horizon=100)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.horizon == 100
    with pytest.raises(ValueError, match="needs both target and horizon"):
        build_kl_controller("adaptive", 0.1)
    with pytest.raises(ValueError, match="unknown KL controller kind"):
        build_kl_controller("pid", 0.1)
    with pytest.raises(ValueError, match="init_kl_coef must be > 0"):
        build_kl_controller("adaptive", 0.0, target=6.0, horizon=100)


def test_kl_config_validation_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="KLConfig.estimator"):
        KLConfig(estimator="k5")
    with pytest.raises(ValueError, match="KLConfig.horizon"):
        KLConfig(horizon=0)
    assert KLConfig(controller="fixed", init_kl_coef=0.0).init_kl_coef == 0.0
    path = tmp_path / "kl.yaml"
    path.write_text("estimator: k3\ncontroller: fixed\ninit_kl_coef: 0.05\n")
    cfg = load_config(KLConfig, path, ["--target", "3"])
    assert (cfg.estimator, cfg.controller, cfg.init_kl_coef, cfg.target) == ("k3", "fixed", 0.05, 3.0)
