"""`bganalysis report RUN`: benchmark deltas against a baseline student next to exposure bias."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="benchmark deltas against a baseline student, next to EB overall / Bridge / Garden",
        description="Join RUN/eval/results.parquet (bganalysis eval --model RUN) with RUN/analysis/summary.json "
                    "(bganalysis analyze): per student, each benchmark metric minus the baseline student's, next to "
                    "exposure bias overall, on Bridges and on Gardens. Writes RUN/eval/decomposition.{md,parquet} and "
                    "RUN/figures/eval_decomposition.{png,svg}, and prints the table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run", metavar="RUN", help="run folder with eval/results.parquet and analysis/summary.json")
    parser.add_argument("--baseline", help="student the deltas are taken against (default: the first student of the analysis)")
    parser.set_defaults(func=run)


def run(args) -> None:
    from pathlib import Path

    from bganalysis.evaluation.report import write_report

    _, text = write_report(Path(args.run), args.baseline)
    log.info("wrote %s and %s", Path(args.run) / "eval" / "decomposition.md", Path(args.run) / "figures" / "eval_decomposition.png")
    print(text)
