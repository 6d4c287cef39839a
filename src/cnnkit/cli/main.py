"""Entry point of the `cnnkit` command.

Each command-family module exposes ``register(subparsers)``, adding its sub-commands with
``set_defaults(func=...)``; ``func(args)`` returns the exit status. Bad input raised as
ValueError / TypeError / OSError becomes one line on stderr and exit status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Command-family modules under cnnkit.cli, in the order their commands are listed.
COMMAND_MODULES = ("models", "train", "runs", "eval")


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
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"cnnkit.cli.{name}").register(sub)
    return parser


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
    except (ValueError, TypeError, OSError, KeyError) as err:
        if args.debug:
            raise
        print(_one_line(err), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
