"""The ``dinolab`` command: a thin layer over the library, one library call per subcommand.

Each subcommand lives next to the code it drives, in a module that exposes
``register(subparsers)``; that function adds its parser and sets ``func`` to a callable
taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that each add one or more subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "dinolab.extract",
    "dinolab.models.convert",
    "dinolab.train.cli",
    "dinolab.eval.cli",
    "dinolab.viz.cli",
    "dinolab.curate.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinolab",
        description="DINOv2 backbones, pretraining, evaluation, curation and feature visualisation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # User-facing problems (bad input, missing file) become one clear line, not a traceback.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"dinolab {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
