"""`tulip-mega <command>`: train, plan, eval, report, data, geco, tokenizer, config, convert, reshard.

Each command imports only what it needs, so `tulip-mega config --keys` or `data synth` do not
pay megatron-core's import time.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Optional, Sequence


def _cmd_data_synth(args: argparse.Namespace) -> int:
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


def _cmd_data_index(args: argparse.Namespace) -> int:
    from tulip_mega.data.dali_index import build_index
    from tulip_mega.data.shards import expand_shards

    damaged = 0
    for shard in expand_shards(args.data):
        r = build_index(shard, args.index_dir)
        damaged += r.damage is not None
        print(f"{r.index}: {r.samples} samples" + (f"  DAMAGED: {r.damage}" if r.damage else ""))
    return 1 if damaged else 0


def inspect_recipe(recipe: str | None, overrides: list[str], out_png: str, rows: int = 8) -> str:
    """Grid of the first batch the recipe's training loader yields on DP rank 0 (seed included)."""
    from tulip_mega.data.inspect import batch_grid
    from tulip_mega.config import load_config
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


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from tulip_mega.config import ConfigError

    overrides = list(args.overrides)
    overrides += [f"data.train_shards={args.data}"] if args.data else []
    overrides += [f"data.tokenizer={args.tokenizer}"] if args.tokenizer else []
    try:
        path = inspect_recipe(args.recipe, overrides, args.out, args.rows)
    except ConfigError as e:
        print(f"tulip-mega: config error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from tulip_mega.data.inspect import shard_stats

    stats = shard_stats(args.data)
    print(json.dumps(stats, indent=2))
    return 1 if stats["damaged_shards"] or stats["problems"] else 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from tulip_mega.data.tokenizer import Tokenizer, train_tokenizer_from_shards

    path = train_tokenizer_from_shards(args.data, args.out, vocab_size=args.vocab_size)
    tok = Tokenizer(path, context_length=16)
    print(f"wrote {path} ({tok.vocab_size} tokens)")
    return 0


def _geco_run(args: argparse.Namespace, make_stage: Callable[[Optional[str]], Any]) -> int:
    """The part `geco text` and `geco image` share: worker split, device, errors, summary line.

    The input shards are resolved before ``make_stage(device)`` loads a model, so a wrong
    ``--in`` fails in a second, not after minutes of loading weights.
    """
    import logging

    from tulip_mega.datagen.geco.run import run_geco, worker_from_env
    from tulip_mega.datagen.geco.text import ModelNotFoundError
    from tulip_mega.data.shards import expand_shards

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    worker, workers, local = worker_from_env()
    worker = worker if args.worker is None else args.worker
    workers = workers if args.num_workers is None else args.num_workers
    try:
        expand_shards(args.data)
        device = args.device
        if device is None and args.model != "eda":
            import torch

            gpus = torch.cuda.device_count()
            device = f"cuda:{local % gpus}" if gpus else "cpu"
        s = run_geco(args.data, args.out, make_stage(device), seed=args.seed, batch_size=args.batch_size,
                     worker=worker, num_workers=workers, progress=not args.no_progress)
    except (ModelNotFoundError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"tulip-mega: geco error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"worker": worker, "num_workers": workers, **s.as_dict()}))
    return 0


def _cmd_geco_text(args: argparse.Namespace) -> int:
    from tulip_mega.datagen.geco.run import TextStage
    from tulip_mega.datagen.geco.text import GenerationSettings

    settings = GenerationSettings(num_paraphrases=args.paraphrases, max_new_tokens=args.max_new_tokens,
                                  max_words=args.max_words, temperature=args.temperature)

    def stage(device: str) -> TextStage:
        if args.model == "eda":
            from tulip_mega.datagen.geco.rules import RuleTextGenerator

            return TextStage(RuleTextGenerator(settings))
        from tulip_mega.datagen.geco.text import LLMTextGenerator

        return TextStage(LLMTextGenerator(args.model, settings, device=device, dtype=args.dtype,
                                          batch_size=args.gen_batch))

    return _geco_run(args, stage)


def _cmd_geco_image(args: argparse.Namespace) -> int:
    from tulip_mega.datagen.geco.image import DiffusersImageEditor, ImageEditSettings, ImageStage

    try:
        settings = ImageEditSettings(
            views=tuple(v.strip() for v in args.views.split(",") if v.strip()), steps=args.steps,
            guidance=args.guidance, image_guidance=args.image_guidance, resolution=args.resolution,
            jpeg_quality=args.jpeg_quality, neg_min_change=args.neg_min_change, pos_max_change=args.pos_max_change,
        )
    except ValueError as e:
        print(f"tulip-mega: geco error: {e}", file=sys.stderr)
        return 2

    def stage(device: str) -> ImageStage:
        editor = DiffusersImageEditor(args.model, settings, device=device, dtype=args.dtype,
                                      batch_size=args.gen_batch)
        return ImageStage(editor)

    return _geco_run(args, stage)


def _geco_common_args(p: argparse.ArgumentParser, batch_help: str, dtype_help: str, batch: int = 16) -> None:
    p.add_argument("--in", dest="data", required=True, help="input shard spec (brace range, glob, folder)")
    p.add_argument("--out", required=True, help="output folder (shards keep their file names)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=batch, help=batch_help)
    p.add_argument("--dtype", default="auto", help=dtype_help)
    p.add_argument("--device", default=None, help="default: cuda:$SLURM_LOCALID if a GPU is visible, else cpu")
    p.add_argument("--worker", type=int, default=None, help="this worker's index (default: from SLURM)")
    p.add_argument("--num-workers", type=int, default=None, help="number of workers (default: from SLURM)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    from tulip_mega.convert.common import ConversionError

    try:
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
    except ConversionError as e:
        print(f"tulip-mega: convert error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_reshard(args: argparse.Namespace) -> int:
    from tulip_mega.config import ConfigError
    from tulip_mega.convert.common import ConversionError
    from tulip_mega.training.reshard import main as reshard_main

    try:
        return reshard_main(args.checkpoint, args.tp, args.pp, args.out, args.overrides, args.virtual)
    except (ConversionError, ConfigError) as e:
        print(f"tulip-mega: reshard error: {e}", file=sys.stderr)
        return 2


def _cmd_report(args: argparse.Namespace) -> int:
    from tulip_mega.report import make_report

    try:
        path = make_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"tulip-mega: report error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tulip-mega", description="TULIP / SigLIP pretraining on megatron-core")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("train", help="train from a recipe (use torchrun or srun for several processes)", add_help=False)
    sub.add_parser("plan", help="check a recipe's layout on N nodes; estimate memory, FLOPs, step time",
                   add_help=False)
    sub.add_parser("eval", help="zero-shot / retrieval evaluation of a checkpoint (torchrun for TP/PP)",
                   add_help=False)
    report = sub.add_parser("report", help="plot a run's loss terms, lr, throughput and eval curves to a PNG")
    report.add_argument("run_dir", help="a run folder holding metrics.jsonl")
    report.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/report.png)")
    report.set_defaults(func=_cmd_report)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
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
    synth.set_defaults(func=_cmd_data_synth)
    dindex = data.add_parser("index", help="write DALI index files (wds2idx v1.2) for shards, damaged tails left out")
    dindex.add_argument("--data", required=True, help="shard spec (brace range, glob, folder)")
    dindex.add_argument("--index-dir", default=None, help="folder for the .idx files (default: beside each shard)")
    dindex.set_defaults(func=_cmd_data_index)
    dinspect = data.add_parser("inspect", help="PNG grid of a recipe's first batch: every view, captions")
    dinspect.add_argument("--recipe", default=None, help="recipe YAML (default: built-in defaults)")
    dinspect.add_argument("overrides", nargs="*", help="recipe overrides (key=value)")
    dinspect.add_argument("--data", default=None, help="shard spec (sets data.train_shards)")
    dinspect.add_argument("--tokenizer", default=None, help="SentencePiece model (sets data.tokenizer)")
    dinspect.add_argument("--out", required=True, help="PNG path")
    dinspect.add_argument("--rows", type=int, default=8, help="samples shown (one per row)")
    dinspect.set_defaults(func=_cmd_data_inspect)
    dstats = data.add_parser("stats", help="count samples, fields, damaged shards and bad samples")
    dstats.add_argument("--data", required=True, help="shard spec (brace range, glob, folder)")
    dstats.set_defaults(func=_cmd_data_stats)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tok_command", required=True)
    tt = tok.add_parser("train", help="train a sentencepiece tokenizer on the captions of shards")
    tt.add_argument("--data", required=True, help="shard spec (brace range, glob, folder)")
    tt.add_argument("--out", required=True, help="output prefix; writes PREFIX.model")
    tt.add_argument("--vocab-size", type=int, default=1024)
    tt.set_defaults(func=_cmd_tokenizer_train)

    geco = sub.add_parser("geco", help="GeCo stage: generate paraphrases / hard negatives into new shards")
    gsub = geco.add_subparsers(dest="geco_command", required=True)
    gt = gsub.add_parser("text", help="paraphrases and meaning-changing edits of captions (key.json)")
    gt.add_argument("--model", required=True,
                    help="local folder or cached name of a transformers causal LM; 'eda' = rule-based fallback")
    _geco_common_args(gt, batch_help="captions per generation batch", dtype_help="torch dtype of the LM")
    gt.add_argument("--gen-batch", type=int, default=64, help="prompts per model.generate call")
    gt.add_argument("--paraphrases", type=int, default=2, help="paraphrases asked for per caption")
    gt.add_argument("--max-new-tokens", type=int, default=64)
    gt.add_argument("--max-words", type=int, default=64, help="longer outputs are dropped")
    gt.add_argument("--temperature", type=float, default=0.7, help="0 = greedy decoding")
    gt.set_defaults(func=_cmd_geco_text)
    gi = gsub.add_parser("image", help="instruction-edited positive / negative views (key.pos.jpg, key.neg.jpg)")
    gi.add_argument("--model", required=True,
                    help="local folder or cached name of a diffusers instruction-editing pipeline "
                         "(e.g. a saved timbrooks/instruct-pix2pix)")
    _geco_common_args(gi, batch_help="samples read per batch (each makes up to 2 edits)",
                      dtype_help="torch dtype of the pipeline (auto = float16 on GPU, float32 on CPU)", batch=8)
    gi.add_argument("--gen-batch", type=int, default=8, help="edits per pipeline call")
    gi.add_argument("--views", default="pos,neg", help="which edits to make: pos, neg or pos,neg")
    gi.add_argument("--steps", type=int, default=20, help="diffusion steps per edit")
    gi.add_argument("--guidance", type=float, default=7.5, help="text guidance scale")
    gi.add_argument("--image-guidance", type=float, default=1.5, help="image guidance scale (InstructPix2Pix)")
    gi.add_argument("--resolution", type=int, default=512, help="short side the editor works at (multiple of 64)")
    gi.add_argument("--jpeg-quality", type=int, default=95)
    gi.add_argument("--neg-min-change", type=float, default=0.02,
                    help="a negative closer to its source (mean |pixel diff| in [0,1]) is dropped as unchanged")
    gi.add_argument("--pos-max-change", type=float, default=0.35,
                    help="a positive further from its source is dropped as too different")
    gi.set_defaults(func=_cmd_geco_image)

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
    conv.set_defaults(func=_cmd_convert)

    rs = sub.add_parser("reshard", help="rewrite a checkpoint for another TP x PP (x virtual) layout")
    rs.add_argument("checkpoint", help="a dist checkpoint folder")
    rs.add_argument("--tp", type=int, required=True, help="new tensor-parallel size")
    rs.add_argument("--pp", type=int, required=True, help="new pipeline-parallel size")
    rs.add_argument("--virtual", type=int, default=1,
                    help="new interleaved virtual stages per PP rank (parallel.virtual_pipeline; 1 = none)")
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
    if argv and argv[0] == "eval":
        import warnings

        # megatron-core's import-time notices (no TE/apex on a CPU) and checkpoint-API deprecations.
        for pattern in (".*(Transformer Engine|Apex).*not installed.*", "full scope is deprecated",
                        ".*(deprecat|DTensor).*"):
            warnings.filterwarnings("ignore", message=pattern)
        from tulip_mega.evaluate import main as eval_main

        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
