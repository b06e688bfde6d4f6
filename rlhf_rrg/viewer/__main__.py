"""``python -m rlhf_rrg.viewer --run-root RUN [--out RUN/eval/viewer.html] [--max-studies 50]``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rlhf_rrg.viewer.render import render_html

logger = logging.getLogger("rlhf_rrg.viewer")


def make_parser() -> argparse.ArgumentParser:
    """Command-line interface of the viewer."""
    parser = argparse.ArgumentParser(description="Write a self-contained HTML page of a run's evaluation.")
    parser.add_argument("--run-root", required=True, help="run root evaluated by rlhf_rrg.evaluate_run")
    parser.add_argument("--out", default=None, help="output HTML (default: <run_root>/eval/viewer.html)")
    parser.add_argument("--max-studies", type=int, default=50, help="studies shown; 0 shows all")
    parser.add_argument("--thumb-size", type=int, default=192, help="largest thumbnail side in px")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Renders the page; returns its path. A run without evaluation exits with a message."""
    args = make_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run_root) / "eval" / "viewer.html"
    try:
        page = render_html(args.run_root, args.max_studies or None, args.thumb_size)
    except FileNotFoundError as err:
        sys.exit(f"rlhf_rrg.viewer: error: {err}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    logger.info("wrote %s (%.1f kB)", out, len(page) / 1024)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
