"""Public inference API: ``ReportGenerator.from_export(path).generate(pixel_values)``."""

from rlhf_rrg.prompting.generator import ReportGenerator

__all__ = ["ReportGenerator"]
