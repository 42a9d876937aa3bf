"""`tulip-mega plan RECIPE --nodes N`: its flags and help are tulip_mega/plan.py's."""

from __future__ import annotations

import argparse

from tulip_mega.commands.common import add_passthrough


def register(sub: argparse._SubParsersAction) -> None:
    """Add `plan`; the rest of the command line goes to `tulip_mega.plan.main`."""
    add_passthrough(sub, "plan", "check a recipe's layout on N nodes; estimate memory, FLOPs, step time", _run)


def _run(argv: list[str]) -> int:
    from tulip_mega.plan import main

    return main(argv)
