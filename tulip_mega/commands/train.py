"""`tulip-mega train RECIPE [key=value ...]`: its flags and help are tulip_mega/train.py's."""

from __future__ import annotations

import argparse

from tulip_mega.commands.common import add_passthrough


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train`; the rest of the command line goes to `tulip_mega.train.main`."""
    add_passthrough(sub, "train", "train from a recipe (use torchrun or srun for several processes)", _run)


def _run(argv: list[str]) -> int:
    from tulip_mega.train import main

    return main(argv)
