"""Command-line entry point: `bganalysis <command> ...`.

Each command lives in `bganalysis/commands/<name>.py` with a `register(subparsers)`
function that adds its parser and sets `func`; every module there is a command. Heavy imports (torch, transformers) happen
inside the commands, so `bganalysis --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import signal
import sys

from bganalysis.errors import UserError



def command_modules() -> list[str]:
    """The names of the modules in `bganalysis.commands`, sorted, so `--help` lists them alphabetically."""
    import bganalysis.commands

    return sorted(info.name for info in pkgutil.iter_modules(bganalysis.commands.__path__))


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="bganalysis",
        description="Distil students from a teacher and measure exposure bias and Bridge/Garden risk.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for name in command_modules():
        importlib.import_module(f"bganalysis.commands.{name}").register(subparsers)
    return parser


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop at the next Python step, like Ctrl-C
    try:
        args.func(args)
    except UserError as error:
        print(f"bganalysis {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bganalysis {args.command}: interrupted; finished outputs are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
