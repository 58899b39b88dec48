"""The ``dinolab`` command: a thin layer over the library, one library call per subcommand.

Each subcommand lives next to the code it drives, in a module that exposes
``register(subparsers)``; that function adds its parser and sets ``func`` to a callable
taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pickle
import sys

# Modules that each add one or more subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "dinolab.features.cli",
    "dinolab.export.cli",
    "dinolab.models.cli",
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


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args`` where ``key=value`` config overrides may stand anywhere on the line.

    argparse gives a ``nargs="*"`` positional only the items of one run, so ``dinolab eval knn --data D ks=[1]``
    would leave ``ks=[1]`` unrecognised: such items are appended to the command's ``overrides`` in order.
    ``--`` before them is the old curate spelling: it still works, with a one-line deprecation note.
    """
    from dinolab.configs.merge import looks_like_override

    args, extra = parser.parse_known_args(argv)
    if extra and not (hasattr(args, "overrides") and all(looks_like_override(e) for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    after_dashes = argv[argv.index("--") + 1:] if "--" in argv else []
    if hasattr(args, "overrides") and after_dashes and all(looks_like_override(a) for a in after_dashes):
        print(f"note: '--' before overrides is deprecated and no longer needed: write them anywhere, e.g. "
              f"dinolab {args.command} ... {after_dashes[0]}", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else list(argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, OSError, RuntimeError, pickle.UnpicklingError) as err:
        # User-facing problems (bad input, missing file, full disk) become one clear line, not a traceback.
        msg = user_error(err)
        if msg is None:
            raise
        print(f"dinolab {args.command}: error: {msg}", file=sys.stderr)
        return 2


def user_error(err: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (keep the traceback)."""
    from dinolab.utils.io import is_disk_full, unpickling_reason

    if is_disk_full(err):
        code = err.errno if isinstance(err, OSError) and err.errno else errno.ENOSPC
        what = "disk quota exceeded" if code == errno.EDQUOT else "no space left on device"
        where = getattr(err, "filename", None)
        return f"{what} writing {where}" if where else f"{what} ({_first_line(err)})"
    if isinstance(err, pickle.UnpicklingError):
        return (f"unreadable torch/pickle file: {unpickling_reason(err)} "
                "(safe loading, torch.load(weights_only=True), reads tensors and plain containers only)")
    if isinstance(err, KeyError):
        return _one_line(str(err.args[0]) if err.args else "KeyError")
    if isinstance(err, (FileNotFoundError, ValueError)):
        return _one_line(str(err))
    if isinstance(err, OSError) and err.filename and err.errno in _PATH_ERRNOS:  # a path the user gave
        return f"{err.strerror or os.strerror(err.errno)}: {err.filename}"
    return None


# OSErrors that are about the path itself (permissions, a file where a folder should be, a read-only disk)
_PATH_ERRNOS = (errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EROFS, errno.EEXIST)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


if __name__ == "__main__":
    sys.exit(main())
