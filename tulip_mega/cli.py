"""`tulip-mega <command>`: train, data, tokenizer, config.

Each command imports only what it needs, so `tulip-mega config --keys` or `data synth` do not
pay megatron-core's import time.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from dataloaders.synthetic import write_shapes_dataset

    info = write_shapes_dataset(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        samples_per_shard=args.samples_per_shard,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(f"wrote {len(info['train_shards'])} train and {len(info['val_shards'])} val shards to {args.out}")
    print(f"  train: {info['train_spec']}")
    print(f"  val:   {info['val_spec']}")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from dataloaders.tokenizer import Tokenizer, train_tokenizer_from_shards

    path = train_tokenizer_from_shards(args.data, args.out, vocab_size=args.vocab_size)
    tok = Tokenizer(path, context_length=16)
    print(f"wrote {path} ({tok.vocab_size} tokens)")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from tulip_mega.config import ConfigError, config_to_dict, help_text, load_config

    if args.keys:
        print(help_text())
        return 0
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"tulip-mega: config error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(config_to_dict(cfg), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tulip-mega", description="TULIP / SigLIP pretraining on megatron-core")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("train", help="train from a recipe (use torchrun or srun for several processes)", add_help=False)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the synthetic shapes dataset as WebDataset shards")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--num-train", type=int, default=2048)
    synth.add_argument("--num-val", type=int, default=256)
    synth.add_argument("--samples-per-shard", type=int, default=256)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_cmd_data_synth)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tok_command", required=True)
    tt = tok.add_parser("train", help="train a sentencepiece tokenizer on the captions of shards")
    tt.add_argument("--data", required=True, help="shard spec (brace range, glob, folder)")
    tt.add_argument("--out", required=True, help="output prefix; writes PREFIX.model")
    tt.add_argument("--vocab-size", type=int, default=1024)
    tt.set_defaults(func=_cmd_tokenizer_train)

    cfg = sub.add_parser("config", help="print the resolved recipe, or every key with --keys")
    cfg.add_argument("recipe", nargs="?", default=None)
    cfg.add_argument("overrides", nargs="*")
    cfg.add_argument("--keys", action="store_true", help="list every recipe key with type, default and help")
    cfg.set_defaults(func=_cmd_config)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from tulip_mega.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
