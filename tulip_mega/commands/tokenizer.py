"""`tulip-mega tokenizer train`: a SentencePiece model from the captions of shards."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `tokenizer` and its `train` sub-command."""
    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tok_command", required=True)
    tt = tok.add_parser("train", help="train a sentencepiece tokenizer on the captions of shards")
    tt.add_argument("--data", required=True, help="shard spec (brace range, glob, folder)")
    tt.add_argument("--out", required=True, help="output prefix; writes PREFIX.model")
    tt.add_argument("--vocab-size", type=int, default=1024)
    tt.set_defaults(func=train)


def train(args: argparse.Namespace) -> int:
    """Train and write PREFIX.model; print its vocabulary size."""
    from tulip_mega.data.tokenizer import Tokenizer, train_tokenizer_from_shards

    path = train_tokenizer_from_shards(args.data, args.out, vocab_size=args.vocab_size)
    tok = Tokenizer(path, context_length=16)
    print(f"wrote {path} ({tok.vocab_size} tokens)")
    return 0
