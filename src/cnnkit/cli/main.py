"""Entry point of the `cnnkit` command.

Each command-family module exposes ``register(subparsers)``, adding its sub-commands with
``set_defaults(func=...)``; ``func(args)`` returns the exit status. Bad input raised as
ValueError / TypeError (library code names the argument, file or field) or OSError (a file
that cannot be read or written) becomes one line on stderr and exit status 2; ``--debug``
(before or after the command: ``cnnkit --debug train`` or ``cnnkit train --debug``) shows the
traceback instead. Any other exception is a bug of ours, never "bad input": it keeps its
traceback and exit status 1. KeyError in particular is not mapped: a missing field of a user's
file is caught where it is read and raised as a ValueError naming the field.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Command-family modules under cnnkit.cli, in the order their commands are listed.
COMMAND_MODULES = (
    "models",
    "train",
    "lr_find",
    "runs",
    "compare",
    "export",
    "eval",
    "detect",
    "data",
)
DEBUG_HELP = "show the traceback of an error instead of one line"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit status 2), pointing at ``--help`` instead of printing the
    whole usage block; sub-command parsers inherit the class."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cnnkit",
        description="Design, train and evaluate convolutional networks.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"cnnkit.cli.{name}").register(sub)
    _add_debug(sub)
    return parser


def _add_debug(sub: argparse._SubParsersAction) -> None:
    """``--debug`` on every (sub-)command too; SUPPRESS keeps the top-level value when absent."""
    for parser in sub.choices.values():
        if not any("--debug" in a.option_strings for a in parser._actions):
            parser.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
            )
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_debug(action)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"cnnkit: error: {text}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        # `cnnkit` alone: the main job, on the embedded default data.
        argv = ["train"]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # `cnnkit models | head`: the reader left; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("cnnkit: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as err:
        if getattr(args, "debug", False):
            raise
        print(_one_line(err), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
