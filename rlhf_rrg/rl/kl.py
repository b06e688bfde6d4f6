"""Per-token KL estimators and KL-coefficient controllers for PPO against a frozen reference policy.

Estimators (J. Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html), for
tokens sampled from the policy ``q`` with reference ``p`` and ``log r = log p(x) - log q(x)``:

- ``k1 = -log r``: unbiased, high variance, can be negative per token (the classic RLHF penalty of
  Ziegler et al. 2019 and InstructGPT);
- ``k2 = (log r)^2 / 2``: biased, low variance, always >= 0;
- ``k3 = (r - 1) - log r``: unbiased, low variance, always >= 0.

Controllers follow Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", Sec. 2.2
(``lm-human-preferences/train_policy.py``; TRL's former ``AdaptiveKLController``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
KLControllerKind = Literal["fixed", "adaptive"]

# Ziegler et al. clip the proportional error to +-0.2 so one noisy batch cannot swing the coefficient.
_ADAPTIVE_ERROR_CLIP = 0.2


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(policy || reference)`` at the sampled tokens.

    Args:
        logprobs: ``(b, t)`` policy log-probabilities of the sampled tokens.
        ref_logprobs: ``(b, t)`` reference-policy log-probabilities of the same tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see the module docstring).

    Returns:
        ``(b, t)`` estimates; padded positions hold whatever the inputs imply, mask them downstream.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ in shape"
        )
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {list(KL_ESTIMATORS)}")


class KLController(Protocol):
    """A KL coefficient ``beta`` that the loop reads each step and may update from the observed KL."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _load_value(kind: str, state: dict[str, Any]) -> float:
    if state.get("kind") != kind:
        raise ValueError(f"KL controller state is for kind {state.get('kind')!r}, this controller is {kind!r}")
    return float(state["value"])


class FixedKLController:
    """A constant KL coefficient.

    Args:
        kl_coef: The coefficient ``beta`` (>= 0).
    """

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = _load_value("fixed", state)


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (Eq. in Sec. 2.2).

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``: beta grows when
    the observed KL is above target and shrinks when below, with time constant ``horizon`` samples.

    Args:
        init_kl_coef: Initial ``beta`` (> 0; a zero coefficient could never grow).
        target: Target KL per sequence, in nats (> 0).
        horizon: Number of samples over which the error is corrected (> 0).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef <= 0:
            raise ValueError(f"init_kl_coef must be > 0 for the adaptive controller, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Updates ``beta`` from the mean sequence KL of the last batch.

        Args:
            current_kl: Observed mean KL per sequence (sum over tokens), in nats.
            n_steps: Number of samples (sequences) that produced ``current_kl``.
        """
        error = min(max(current_kl / self.target - 1.0, -_ADAPTIVE_ERROR_CLIP), _ADAPTIVE_ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "adaptive", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = _load_value("adaptive", state)


def build_kl_controller(
    kind: KLControllerKind, init_kl_coef: float, target: float | None = None, horizon: int | None = None
) -> FixedKLController | AdaptiveKLController:
    """Builds a KL controller by name.

    Args:
        kind: ``"fixed"`` or ``"adaptive"``.
        init_kl_coef: Initial (or constant) coefficient ``beta``.
        target: Target KL; required for ``"adaptive"``.
        horizon: Horizon in samples; required for ``"adaptive"``.

    Returns:
        The controller.
    """
    if kind == "fixed":
        return FixedKLController(init_kl_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("the adaptive KL controller needs both target and horizon")
        return AdaptiveKLController(init_kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller kind {kind!r}; choose 'fixed' or 'adaptive'")


@dataclass
class KLConfig:
    """KL penalty settings for PPO (defaults: Ziegler et al. 2019 / TRL's former ``PPOConfig``)."""

    estimator: KLEstimator = field(
        default="k1", metadata={"help": "Per-token KL estimator: k1, k2 or k3 (Schulman 2020)."}
    )
    controller: KLControllerKind = field(
        default="adaptive", metadata={"help": "KL coefficient controller: fixed or adaptive."}
    )
    init_kl_coef: float = field(default=0.2, metadata={"help": "Initial (or fixed) KL coefficient beta."})
    target: float = field(default=6.0, metadata={"help": "Adaptive controller: target KL per sequence, in nats."})
    horizon: int = field(default=10000, metadata={"help": "Adaptive controller: horizon in samples."})

    def __post_init__(self) -> None:
        if self.estimator not in KL_ESTIMATORS:
            raise ValueError(f"KLConfig.estimator: {self.estimator!r} is not one of {list(KL_ESTIMATORS)}")
        if self.controller not in ("fixed", "adaptive"):
            raise ValueError(f"KLConfig.controller: {self.controller!r} is not one of ['fixed', 'adaptive']")
        if self.init_kl_coef < 0 or (self.controller == "adaptive" and self.init_kl_coef == 0):
            raise ValueError(f"KLConfig.init_kl_coef: must be > 0 (>= 0 when fixed), got {self.init_kl_coef}")
        if self.target <= 0:
            raise ValueError(f"KLConfig.target: must be > 0, got {self.target}")
        if self.horizon <= 0:
            raise ValueError(f"KLConfig.horizon: must be > 0, got {self.horizon}")
