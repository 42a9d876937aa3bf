"""`tulip-mega report RUN_DIR`: plot a run's metrics to a PNG."""

from __future__ import annotations

import argparse

from tulip_mega.commands.common import error_exit


def register(sub: argparse._SubParsersAction) -> None:
    """Add `report`."""
    report = sub.add_parser("report", help="plot a run's loss terms, lr, throughput and eval curves to a PNG")
    report.add_argument("run_dir", help="a run folder holding metrics.jsonl")
    report.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/report.png)")
    report.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report PNG; exit 2 when the run folder has no readable metrics."""
    from tulip_mega.report import make_report

    try:
        path = make_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        return error_exit("report", e)
    print(f"wrote {path}")
    return 0
