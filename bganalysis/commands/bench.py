"""`bganalysis bench TARGET [--quick]`: fast paths against their plain references.

Each target has a light module `bganalysis/bench/targets/<target>.py` (no torch import)
with `register(subparsers)`, which adds the target's parser (its options and `func`); the
work itself lives in `bganalysis/bench/<target>.py`. Every target prints one JSON line
last and writes it under `--out`.
"""

from __future__ import annotations

import importlib
import pkgutil


def bench_targets() -> list[str]:
    """The modules of `bganalysis.bench.targets`, sorted."""
    import bganalysis.bench.targets

    return sorted(info.name for info in pkgutil.iter_modules(bganalysis.bench.targets.__path__))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark a fast path against its plain reference",
        description="Time a fast path against its plain reference and print one JSON line of ratios last. "
                    "See `bganalysis bench TARGET --help` for each target.",
    )
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True,
                                    parser_class=type(parser))
    for name in bench_targets():
        importlib.import_module(f"bganalysis.bench.targets.{name}").register(targets)


def set_threads(threads: int | None) -> None:
    """Apply `--threads`, shared by every target."""
    import torch

    from bganalysis.errors import UserError

    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads {threads} is invalid: it must be an integer >= 1")
    torch.set_num_threads(threads)
