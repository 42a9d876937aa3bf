"""`tulip-mega eval CHECKPOINT`: its flags and help are tulip_mega/evaluate.py's."""

from __future__ import annotations

import argparse
import warnings

from tulip_mega.commands.common import add_passthrough

# megatron-core's import-time notices (no TE/apex on a CPU) and checkpoint-API deprecations.
_QUIET = (".*(Transformer Engine|Apex).*not installed.*", "full scope is deprecated", ".*(deprecat|DTensor).*")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `eval`; the rest of the command line goes to `tulip_mega.evaluate.main`."""
    add_passthrough(sub, "eval", "zero-shot / retrieval evaluation of a checkpoint (torchrun for TP/PP)", _run)


def _run(argv: list[str]) -> int:
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    from tulip_mega.evaluate import main

    return main(argv)
