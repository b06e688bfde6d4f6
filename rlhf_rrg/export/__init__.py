"""Hugging Face-native exports: remote code, model card, Hub upload."""
