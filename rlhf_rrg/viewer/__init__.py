"""Static HTML viewer of a run's evaluation (``python -m rlhf_rrg.viewer --run-root RUN --out viewer.html``)."""

from rlhf_rrg.viewer.render import finding_diff, load_run_eval, render_html

__all__ = ["finding_diff", "load_run_eval", "render_html"]
