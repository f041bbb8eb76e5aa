"""`bganalysis plot`: every figure of a run as PNG and SVG, and report.md that embeds them."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="write every figure of a run directory as PNG and SVG, and report.md",
        description="Draw exposure bias, kappa and benchmark figures from RUN/analysis and RUN/eval "
                    "into RUN/figures (PNG and SVG, one colour per supervision method), then rewrite RUN/report.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run", metavar="RUN", help="run directory with analysis/tokens.parquet, steps.parquet and summary.json")
    parser.add_argument("--reference", help="model that benchmark deltas are measured against (default: the first in eval/results.parquet)")
    parser.set_defaults(func=run)


def run(args) -> None:
    import json
    import logging
    from pathlib import Path

    from bganalysis.plots.write import read_analysis, write_all_figures
    from bganalysis.report import write_report

    folder = Path(args.run)
    _, _, summary = read_analysis(folder)
    names = write_all_figures(folder, args.reference)
    timings = None
    if (folder / "demo.json").is_file():
        timings = json.loads((folder / "demo.json").read_text())
    path = write_report(folder, summary, timings)
    logging.getLogger("bganalysis").info("wrote %s figures and %s", len(names), path)
