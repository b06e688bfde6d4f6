"""Pure RL math: advantages, KL, PPO/SCST losses. Tensor shapes are in each docstring."""
