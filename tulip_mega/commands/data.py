"""`tulip-mega data synth | index | inspect | stats | prepare`: dataset tools."""

from __future__ import annotations

import argparse
import json
import os

from tulip_mega.commands.common import error_exit

_SHARDS_HELP = "shard spec (brace range, glob, folder)"


def register(sub: argparse._SubParsersAction) -> None:
    """Add `data` and its five sub-commands."""
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    _add_synth(data)
    _add_index(data)
    _add_inspect(data)
    _add_stats(data)
    _add_prepare(data)


def _add_synth(data: argparse._SubParsersAction) -> None:
    synth = data.add_parser("synth", help="write a synthetic dataset (shapes or scenes) as WebDataset shards")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--kind", choices=["shapes", "scenes"], default="shapes",
                       help="shapes: one coloured shape per image, classes.json for zero-shot; scenes: counts, "
                            "relative positions, sizes and colour binding with one-attribute hard negatives, "
                            "scenes.json for tulip_mega/eval/scenes.py (benchmarks/quality.py)")
    synth.add_argument("--num-train", type=int, default=None, help="default: shapes 8192, scenes 4096")
    synth.add_argument("--num-val", type=int, default=None, help="default: shapes 256, scenes 512")
    synth.add_argument("--samples-per-shard", type=int, default=None, help="default: shapes 1024, scenes 256")
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=synth_dataset)


def _add_index(data: argparse._SubParsersAction) -> None:
    dindex = data.add_parser("index", help="write DALI index files (wds2idx v1.2) for shards, damaged tails left out")
    dindex.add_argument("--data", required=True, help=_SHARDS_HELP)
    dindex.add_argument("--index-dir", default=None, help="folder for the .idx files (default: beside each shard)")
    dindex.set_defaults(func=index_shards)


def _add_inspect(data: argparse._SubParsersAction) -> None:
    dinspect = data.add_parser("inspect", help="PNG grid of a recipe's first batch: every view, captions")
    dinspect.add_argument("--recipe", default=None, help="recipe YAML (default: built-in defaults)")
    dinspect.add_argument("overrides", nargs="*", help="recipe overrides (key=value)")
    dinspect.add_argument("--data", default=None, help="shard spec (sets data.train_shards)")
    dinspect.add_argument("--tokenizer", default=None, help="SentencePiece model (sets data.tokenizer)")
    dinspect.add_argument("--out", required=True, help="PNG path")
    dinspect.add_argument("--rows", type=int, default=8, help="samples shown (one per row)")
    dinspect.set_defaults(func=inspect_batch)


def _add_stats(data: argparse._SubParsersAction) -> None:
    dstats = data.add_parser("stats", help="count samples, fields, damaged shards and bad samples")
    dstats.add_argument("--data", required=True, help=_SHARDS_HELP)
    dstats.set_defaults(func=shard_stats)


def _add_prepare(data: argparse._SubParsersAction) -> None:
    dprep = data.add_parser("prepare", help="make a shard folder an energon dataset (.nv-meta/) and check it with "
                                            "our reader; the folder then works as data.train_shards")
    dprep.add_argument("path", help="folder of WebDataset .tar shards (searched recursively, as energon does)")
    dprep.add_argument("--split-parts", nargs="+", default=None, metavar="NAME:PATTERN",
                       help="energon split parts, e.g. train:train-.* val:val-.* (a regex on shard names "
                            "relative to PATH, {a..b} braces allowed); default: every shard in train")
    dprep.add_argument("--num-workers", type=int, default=2, help="energon's indexing processes")
    dprep.set_defaults(func=prepare_folder)


def synth_dataset(args: argparse.Namespace) -> int:
    """`data synth`: write the shapes or scenes set and print where its splits are."""
    if args.kind == "scenes":
        from tulip_mega.datagen.synthetic_scenes import write_scenes_dataset as write
    else:
        from tulip_mega.datagen.synthetic import write_shapes_dataset as write

    # Unset sizes take each writer's own defaults (shapes: the quickstart's 8 x 1024 samples).
    sizes = {k: getattr(args, k) for k in ("num_train", "num_val", "samples_per_shard") if getattr(args, k) is not None}
    info = write(args.out, image_size=args.image_size, seed=args.seed, **sizes)
    print(f"wrote {len(info['train_shards'])} train and {len(info['val_shards'])} val shards to {args.out}")
    print(f"  train: {info['train_spec']}")
    print(f"  val:   {info['val_spec']}")
    return 0


def index_shards(args: argparse.Namespace) -> int:
    """`data index`: one DALI index per shard; exit 1 when any shard is damaged."""
    from tulip_mega.data.dali_index import build_index, index_path
    from tulip_mega.data.shards import expand_shards

    damaged = 0
    shards = expand_shards(args.data)
    for shard in shards:  # refuse before writing any
        path = index_path(shard, args.index_dir)
        if os.path.isfile(path) and not _is_dali_index(path):
            return error_exit("data index", ValueError(
                f"{path} exists and is not a DALI index: energon's binary tar index of {shard} has this name "
                "(written by `data prepare` / `energon prepare`), and energon needs it to read the folder; "
                "pass --index-dir DIR to keep DALI indexes elsewhere"))
    for shard in shards:
        r = build_index(shard, args.index_dir)
        damaged += r.damage is not None
        print(f"{r.index}: {r.samples} samples" + (f"  DAMAGED: {r.damage}" if r.damage else ""))
    return 1 if damaged else 0


def _is_dali_index(path: str) -> bool:
    """A wds2idx file starts with ``v1``; energon's ``<shard>.idx`` is packed 64-bit offsets."""
    with open(path, "rb") as f:
        return f.read(2) == b"v1"


def inspect_recipe(recipe: str | None, overrides: list[str], out_png: str, rows: int = 8) -> str:
    """Grid of the first batch the recipe's training loader yields on DP rank 0 (seed included)."""
    from tulip_mega.config import load_config
    from tulip_mega.data.inspect import batch_grid
    from tulip_mega.launch import resolve_layout
    from tulip_mega.training.data import build_train_loader

    # One micro-batch of `rows` samples in one process: DP rank 0 reads the same samples at any TP x PP.
    one_process = ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "parallel.virtual_pipeline=1",
                   "parallel.pipeline_split=even"]
    cfg = load_config(recipe, [*overrides, f"train.micro_batch_size={rows}", f"train.global_batch_size={rows}",
                               *one_process])
    loader = build_train_loader(cfg, resolve_layout(cfg, 1), dp_rank=0)
    batch = next(iter(loader))
    tok = getattr(loader, "tokenizer")
    return batch_grid(batch, tok.decode(batch.tokens), out_png, max_rows=rows)


def inspect_batch(args: argparse.Namespace) -> int:
    """`data inspect`: write the first-batch grid; exit 2 on a recipe error."""
    from tulip_mega.config import ConfigError

    overrides = list(args.overrides)
    overrides += [f"data.train_shards={args.data}"] if args.data else []
    overrides += [f"data.tokenizer={args.tokenizer}"] if args.tokenizer else []
    try:
        path = inspect_recipe(args.recipe, overrides, args.out, args.rows)
    except ConfigError as e:
        return error_exit("config", e)
    print(f"wrote {path}")
    return 0


def shard_stats(args: argparse.Namespace) -> int:
    """`data stats`: print the shard statistics as JSON; exit 1 when something is damaged."""
    from tulip_mega.data.inspect import shard_stats as stats_of

    stats = stats_of(args.data)
    print(json.dumps(stats, indent=2))
    return 1 if stats["damaged_shards"] or stats["problems"] else 0


def prepare_folder(args: argparse.Namespace) -> int:
    """`data prepare`: energon's preparation, then our reader's summary; exit 1 when a shard is
    damaged (like `data index` and `data stats`), 2 when nothing could be prepared."""
    from tulip_mega.data.energon_prepare import prepare_dataset

    try:
        report = prepare_dataset(args.path, args.split_parts, args.num_workers)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        return error_exit("data prepare", e)
    print(f"prepared {report.root} as an energon dataset (CrudeWebdataset): "
          + ", ".join(f"{name} {n} shards" for name, n in report.split_parts.items()))
    print(f"read with tulip-mega's reader: {len(report.shards)} shards, {report.samples} samples")
    print("parts: " + ", ".join(f"{ext} {n}" for ext, n in sorted(report.parts.items())))
    no_image = sum(s.no_image for s in report.shards)
    no_caption = sum(s.no_caption for s in report.shards)
    print(f"samples without an image (jpg): {no_image}; without a caption (txt): {no_caption}")
    print(f"damaged shards: {len(report.damaged)}")
    for s in report.damaged:
        print(f"  {s.name}: {s.samples} samples before the damage; {s.damage}")
    for name, why in report.left_out.items():
        print(f"left out of energon's index: {name}: {why}")
    if report.dali_indexes_replaced:
        print(f"energon replaced {report.dali_indexes_replaced} DALI index files (<shard>.idx is also the name of "
              "its binary tar index); `tulip-mega data index --index-dir DIR` writes DALI indexes elsewhere")
    print(f"wrote our per-shard counts to {report.counts_file}")
    return 1 if report.damaged or report.left_out else 0
