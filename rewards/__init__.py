"""Rewards and metrics for radiology report generation, usable by TRL trainers and our PPO/SCST loop.

Model-based scorers (BERTScore, CheXbert, RadGraph) load their weights lazily, so importing this package
needs no weight files.
"""

from rewards.base import Reward, RewardOutput
from rewards.composite import (
    REGISTRY,
    CompositeReward,
    build_reward,
    build_reward_from_config,
    clinical_offline,
    default_reward,
)

__all__ = [
    "REGISTRY",
    "CompositeReward",
    "Reward",
    "RewardOutput",
    "build_reward",
    "build_reward_from_config",
    "clinical_offline",
    "default_reward",
]
