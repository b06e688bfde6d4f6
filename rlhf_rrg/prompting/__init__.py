"""Prompting: a study (its images, retrieved context, disease clues) as model inputs, and the ``ReportGenerator``
that ties the model, its processor and the context retriever together for SFT, RL and inference."""
