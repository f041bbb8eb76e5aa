"""`bganalysis train`: train one student from a recipe YAML and command-line flags.

Every TrainConfig field is a flag (`loss_temperature` is `--loss-temperature`). The
recipe's settings are loaded first and flags override them. With no arguments the
command trains the default hybrid student on the lab.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from bganalysis.errors import UserError
from bganalysis.train import TrainConfig


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a student from a teacher with hard, soft or hybrid labels",
        description=(
            "Train a student from a teacher. Settings come from TrainConfig defaults, then "
            "--recipe FILE.yaml, then flags. The student is written to OUT/students/NAME."
        ),
    )
    parser.add_argument("--recipe", metavar="FILE.yaml", help="recipe YAML (see training/); flags override its settings")
    hints = typing.get_type_hints(TrainConfig)
    for spec in _config_fields():
        flag = "--" + spec.name.replace("_", "-")
        help_text = spec.metadata["help"]
        if spec.default is not None:
            help_text += f" (default: {spec.default})"
        if hints[spec.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            # Values stay strings here, so TrainConfig converts them and reports a bad one as one line.
            parser.add_argument(flag, metavar=spec.name.upper(), default=argparse.SUPPRESS, help=help_text)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from bganalysis.train import train

    values = load_recipe(args.recipe) if args.recipe else {}
    values.update({spec.name: getattr(args, spec.name) for spec in _config_fields() if hasattr(args, spec.name)})
    folder = train(TrainConfig(**values))
    print(folder)


def load_recipe(path: str | Path) -> dict:
    """Read a recipe YAML into a dict of TrainConfig fields.

    Keys may use `-` or `_`. The `provenance` section that training writes into
    train_config.yaml is skipped, so a finished run's config is itself a valid recipe.
    Raises UserError for a missing or malformed file and for unknown keys.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}; pass a YAML file such as training/hybrid.yaml")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise UserError(f"recipe {path} is not valid YAML ({str(error).splitlines()[0]}); fix the file") from None
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {path} must be a mapping of setting: value, found {type(recipe).__name__}")

    recipe = {str(key).replace("-", "_"): value for key, value in recipe.items() if key != "provenance"}
    valid = [spec.name for spec in _config_fields()]
    unknown = sorted(set(recipe) - set(valid))
    if unknown:
        raise UserError(f"recipe {path} has unknown keys {', '.join(unknown)}; valid keys are {', '.join(valid)}")
    return recipe


def _config_fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(TrainConfig)
