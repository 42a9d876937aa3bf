"""`tulip-mega reshard CKPT --tp T --pp P OUT`: rewrite a checkpoint for another layout."""

from __future__ import annotations

import argparse

from tulip_mega.commands.common import error_exit


def register(sub: argparse._SubParsersAction) -> None:
    """Add `reshard`."""
    rs = sub.add_parser("reshard", help="rewrite a checkpoint for another TP x PP (x virtual) layout")
    rs.add_argument("checkpoint", help="a dist checkpoint folder")
    rs.add_argument("--tp", type=int, required=True, help="new tensor-parallel size")
    rs.add_argument("--pp", type=int, required=True, help="new pipeline-parallel size")
    rs.add_argument("--virtual", type=int, default=1,
                    help="new interleaved virtual stages per PP rank (parallel.virtual_pipeline; 1 = none)")
    rs.add_argument("out", help="output checkpoint root (gets step_<N>/ and latest)")
    rs.add_argument("overrides", nargs="*", help="recipe overrides (key=value) for the loading run")
    rs.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Reshard; exit 2 on a checkpoint or recipe that cannot be resharded."""
    from tulip_mega.config import ConfigError
    from tulip_mega.convert.common import ConversionError
    from tulip_mega.training.reshard import main as reshard_main

    try:
        return reshard_main(args.checkpoint, args.tp, args.pp, args.out, args.overrides, args.virtual)
    except (ConversionError, ConfigError) as e:
        return error_exit("reshard", e)
