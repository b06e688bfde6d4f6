"""Models: Mamba/ViT vision encoders, projector, the LLaVA-style report generator."""
