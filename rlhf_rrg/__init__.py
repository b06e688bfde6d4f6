"""rlhf-rrg: chest X-ray radiology report generation trained end to end and optimised with RL."""

__version__ = "0.1.0"
