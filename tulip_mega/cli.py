"""`tulip-mega <command>`: train, plan, eval, report, data, tokenizer, geco, convert, reshard, config.

Each command lives in its own module under tulip_mega/commands/, which adds its sub-parser and
handler; this module only assembles them in the order `tulip-mega --help` lists them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from tulip_mega.commands import config, convert, data, evaluate, geco, plan, report, reshard, tokenizer, train

COMMANDS = (train, plan, evaluate, report, data, tokenizer, geco, convert, reshard, config)


def build_parser() -> argparse.ArgumentParser:
    """The `tulip-mega` parser: one sub-parser per command module, in COMMANDS order."""
    p = argparse.ArgumentParser(prog="tulip-mega", description="TULIP / SigLIP pretraining on megatron-core")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command named on the command line (default: sys.argv); returns its exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
