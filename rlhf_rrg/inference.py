"""Public inference API: ``ReportGenerator.from_export(path).generate(pixel_values)``."""

from rlhf_rrg.models.generator import ReportGenerator

__all__ = ["ReportGenerator"]
