"""`tulip-mega <command>`: train, data, tokenizer, config, convert, reshard.

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


def _cmd_convert(args: argparse.Namespace) -> int:
    from tulip_mega.convert.megatron_to_plain import ConversionError

    try:
        if args.to == "hf":
            from tulip_mega.convert.hf import export_hf

            export_hf(args.checkpoint, args.out, tokenizer=args.tokenizer, layernorm_eps=args.layernorm_eps)
        else:
            from tulip_mega.convert.megatron_to_plain import convert_checkpoint

            if args.tokenizer:
                print("note: --tokenizer is only used with --to hf", file=sys.stderr)
            convert_checkpoint(args.checkpoint, args.out, layernorm_eps=args.layernorm_eps)
    except ConversionError as e:
        print(f"tulip-mega: convert error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_reshard(args: argparse.Namespace) -> int:
    from tulip_mega.config import ConfigError
    from tulip_mega.convert.megatron_to_plain import ConversionError
    from tulip_mega.convert.reshard import main as reshard_main

    try:
        return reshard_main(args.checkpoint, args.tp, args.pp, args.out, args.overrides)
    except (ConversionError, ConfigError) as e:
        print(f"tulip-mega: reshard error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tulip-mega", description="TULIP / SigLIP pretraining on megatron-core")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("train", help="train from a recipe (use torchrun or srun for several processes)", add_help=False)
    sub.add_parser("plan", help="check a recipe's layout on N nodes; estimate memory, FLOPs, step time",
                   add_help=False)

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

    conv = sub.add_parser("convert", help="export a checkpoint to plain PyTorch or Hugging Face SiglipModel")
    conv.add_argument("checkpoint", help="a dist checkpoint folder (e.g. runs/x/checkpoints/step_0000100)")
    conv.add_argument("--to", choices=["pytorch", "hf"], required=True,
                      help="pytorch: model.safetensors + config.json for tulip_mega.convert.plain_model; "
                           "hf: a transformers SiglipModel folder")
    conv.add_argument("out", help="output folder")
    conv.add_argument("--tokenizer", default=None, help="the run's SentencePiece .model (hf: adds processor files)")
    conv.add_argument("--layernorm-eps", type=float, default=None,
                      help="model.layernorm_eps when no run config.yaml sits beside the checkpoint")
    conv.set_defaults(func=_cmd_convert)

    rs = sub.add_parser("reshard", help="rewrite a checkpoint for another TP x PP layout")
    rs.add_argument("checkpoint", help="a dist checkpoint folder")
    rs.add_argument("--tp", type=int, required=True, help="new tensor-parallel size")
    rs.add_argument("--pp", type=int, required=True, help="new pipeline-parallel size")
    rs.add_argument("out", help="output checkpoint root (gets step_<N>/ and latest)")
    rs.add_argument("overrides", nargs="*", help="recipe overrides (key=value) for the loading run")
    rs.set_defaults(func=_cmd_reshard)

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
    if argv and argv[0] == "plan":
        from tulip_mega.plan import main as plan_main

        return plan_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
