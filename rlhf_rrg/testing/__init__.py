"""Tiny models and fixtures shared by tests, the demo and benchmarks."""
