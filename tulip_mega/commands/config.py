"""`tulip-mega config [RECIPE] [key=value ...] [--keys]`: the resolved recipe, or every key."""

from __future__ import annotations

import argparse
import json

from tulip_mega.commands.common import error_exit


def register(sub: argparse._SubParsersAction) -> None:
    """Add `config`."""
    cfg = sub.add_parser("config", help="print the resolved recipe, or every key with --keys")
    cfg.add_argument("recipe", nargs="?", default=None)
    cfg.add_argument("overrides", nargs="*")
    cfg.add_argument("--keys", action="store_true", help="list every recipe key with type, default and help")
    cfg.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the recipe as JSON (or the key table); exit 2 on a config error."""
    from tulip_mega.config import ConfigError, config_to_dict, help_text, load_config

    if args.keys:
        print(help_text())
        return 0
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        return error_exit("config", e)
    print(json.dumps(config_to_dict(cfg), indent=2))
    return 0
