"""Helpers the command modules share: commands that own their command line, and error exits."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def add_passthrough(sub: argparse._SubParsersAction, name: str, help: str, run: Callable[[list[str]], int]) -> None:
    """Add command `name` whose words after the name all go, unparsed, to `run` (a module's own
    `main(argv)`), so that parser prints the command's --help, usage and errors.

    The sub-parser has no options, and no word can start with its prefix character (NUL), so
    argparse reads every word, `-h` and `--` included, as part of the one remaining positional.
    """
    parser = sub.add_parser(name, help=help, add_help=False, prefix_chars="\0")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    parser.set_defaults(func=lambda args: run(args.argv))


def error_exit(kind: str, error: BaseException) -> int:
    """Print `tulip-mega: <kind> error: <message>` to stderr; the exit status 2 of a usage error."""
    print(f"tulip-mega: {kind} error: {error}", file=sys.stderr)
    return 2
