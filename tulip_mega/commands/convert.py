"""`tulip-mega convert CKPT --to pytorch|hf|open_clip OUT`: export a dist checkpoint."""

from __future__ import annotations

import argparse
import sys

from tulip_mega.commands.common import error_exit


def register(sub: argparse._SubParsersAction) -> None:
    """Add `convert`."""
    conv = sub.add_parser("convert", help="export a checkpoint to plain PyTorch, Hugging Face SiglipModel or open_clip")
    conv.add_argument("checkpoint", help="a dist checkpoint folder (e.g. runs/x/checkpoints/step_0000100)")
    conv.add_argument("--to", choices=["pytorch", "hf", "open_clip"], required=True,
                      help="pytorch: model.safetensors + config.json for tulip_mega.convert.plain_model; "
                           "hf: a transformers SiglipModel folder; open_clip: an open_clip folder "
                           "(create_model_and_transforms('local-dir:OUT'))")
    conv.add_argument("out", help="output folder")
    conv.add_argument("--tokenizer", default=None, help="the run's SentencePiece .model (hf: adds processor files; open_clip: the tokenizer)")
    conv.add_argument("--layernorm-eps", type=float, default=None,
                      help="model.layernorm_eps when no run config.yaml sits beside the checkpoint")
    conv.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export to the chosen format; exit 2 on a checkpoint or model that cannot be converted."""
    from tulip_mega.convert.common import ConversionError

    try:
        _export(args)
    except ConversionError as e:
        return error_exit("convert", e)
    return 0


def _export(args: argparse.Namespace) -> None:
    if args.to == "hf":
        from tulip_mega.convert.hf import export_hf

        export_hf(args.checkpoint, args.out, tokenizer=args.tokenizer, layernorm_eps=args.layernorm_eps)
    elif args.to == "open_clip":
        from tulip_mega.convert.openclip import export_open_clip

        export_open_clip(args.checkpoint, args.out, tokenizer=args.tokenizer, layernorm_eps=args.layernorm_eps)
    else:
        from tulip_mega.convert.plain import convert_checkpoint

        if args.tokenizer:
            print("note: --tokenizer is only used with --to hf", file=sys.stderr)
        convert_checkpoint(args.checkpoint, args.out, layernorm_eps=args.layernorm_eps)
