"""`bganalysis demo`: the main job on the built-in lab."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train hard, soft, hybrid and argmax-hard students on the lab, analyse them, write report.md",
        description="The whole pipeline on the built-in lab: exact teacher, four students, exposure "
                    "bias, kappa checked against exact values, figures and report.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default="runs/demo", help="run directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation, sampling and bootstrap")
    parser.add_argument("--lam", type=float, default=0.5, help="soft weight of the hybrid student, in [0, 1]")
    parser.add_argument("--quick", action="store_true", help="a tiny budget (seconds, not minutes) for smoke tests; the numbers mean little")
    parser.set_defaults(func=run)


def run(args) -> None:
    from bganalysis.demo import QUICK, DemoSize, run_demo
    from bganalysis.errors import UserError

    if not 0.0 <= args.lam <= 1.0:
        raise UserError(f"--lam {args.lam} is invalid: the soft weight must be in [0, 1]")
    run_demo(args.out, QUICK if args.quick else DemoSize(), seed=args.seed, lam=args.lam)
