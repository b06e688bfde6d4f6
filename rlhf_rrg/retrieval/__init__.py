"""Retrieval of similar training studies (memory bank) for context-conditioned generation."""
