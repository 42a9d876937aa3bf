"""`tulip-mega geco text | image`: the GeCo stages, writing paraphrases, hard negatives and
edited views into new shards."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Optional

from tulip_mega.commands.common import error_exit


def register(sub: argparse._SubParsersAction) -> None:
    """Add `geco` and its `text` and `image` stages."""
    geco = sub.add_parser("geco", help="GeCo stage: generate paraphrases / hard negatives into new shards")
    gsub = geco.add_subparsers(dest="geco_command", required=True)
    _add_text(gsub)
    _add_image(gsub)


def _add_common(p: argparse.ArgumentParser, batch_help: str, dtype_help: str, batch: int = 16) -> None:
    p.add_argument("--in", dest="data", required=True, help="input shard spec (brace range, glob, folder)")
    p.add_argument("--out", required=True, help="output folder (shards keep their file names)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=batch, help=batch_help)
    p.add_argument("--dtype", default="auto", help=dtype_help)
    p.add_argument("--device", default=None, help="default: cuda:$SLURM_LOCALID if a GPU is visible, else cpu")
    p.add_argument("--worker", type=int, default=None, help="this worker's index (default: from SLURM)")
    p.add_argument("--num-workers", type=int, default=None, help="number of workers (default: from SLURM)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_text(gsub: argparse._SubParsersAction) -> None:
    gt = gsub.add_parser("text", help="paraphrases and meaning-changing edits of captions (key.json)")
    gt.add_argument("--model", required=True,
                    help="local folder or cached name of a transformers causal LM; 'eda' = rule-based fallback")
    _add_common(gt, batch_help="captions per generation batch", dtype_help="torch dtype of the LM")
    gt.add_argument("--gen-batch", type=int, default=64, help="prompts per model.generate call")
    gt.add_argument("--paraphrases", type=int, default=2, help="paraphrases asked for per caption")
    gt.add_argument("--max-new-tokens", type=int, default=64)
    gt.add_argument("--max-words", type=int, default=64, help="longer outputs are dropped")
    gt.add_argument("--temperature", type=float, default=0.7, help="0 = greedy decoding")
    gt.set_defaults(func=text_stage)


def _add_image(gsub: argparse._SubParsersAction) -> None:
    gi = gsub.add_parser("image", help="instruction-edited positive / negative views (key.pos.jpg, key.neg.jpg)")
    gi.add_argument("--model", required=True,
                    help="local folder or cached name of a diffusers instruction-editing pipeline "
                         "(e.g. a saved timbrooks/instruct-pix2pix)")
    _add_common(gi, batch_help="samples read per batch (each makes up to 2 edits)",
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
    gi.set_defaults(func=image_stage)


def _run(args: argparse.Namespace, make_stage: Callable[[Optional[str]], Any]) -> int:
    """The part `geco text` and `geco image` share: worker split, device, errors, summary line.

    The input shards are resolved before ``make_stage(device)`` loads a model, so a wrong
    ``--in`` fails in a second, not after minutes of loading weights.
    """
    import logging

    from tulip_mega.data.shards import expand_shards
    from tulip_mega.datagen.geco.run import run_geco, worker_from_env
    from tulip_mega.datagen.geco.text import ModelNotFoundError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    worker, workers, local = worker_from_env()
    worker = worker if args.worker is None else args.worker
    workers = workers if args.num_workers is None else args.num_workers
    try:
        expand_shards(args.data)
        s = run_geco(args.data, args.out, make_stage(_device(args, local)), seed=args.seed,
                     batch_size=args.batch_size, worker=worker, num_workers=workers, progress=not args.no_progress)
    except (ModelNotFoundError, FileNotFoundError, ValueError, ImportError) as e:
        return error_exit("geco", e)
    print(json.dumps({"worker": worker, "num_workers": workers, **s.as_dict()}))
    return 0


def _device(args: argparse.Namespace, local: int) -> Optional[str]:
    """--device, else (for a model stage) this node-local worker's GPU when one is visible, else cpu."""
    if args.device is not None or args.model == "eda":
        return args.device
    import torch

    gpus = torch.cuda.device_count()
    return f"cuda:{local % gpus}" if gpus else "cpu"


def text_stage(args: argparse.Namespace) -> int:
    """`geco text`: an LLM (or the rule-based 'eda' fallback) rewrites each caption."""
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

    return _run(args, stage)


def image_stage(args: argparse.Namespace) -> int:
    """`geco image`: a diffusers instruction editor makes the positive / negative views."""
    from tulip_mega.datagen.geco.image import DiffusersImageEditor, ImageEditSettings, ImageStage

    try:
        settings = ImageEditSettings(
            views=tuple(v.strip() for v in args.views.split(",") if v.strip()), steps=args.steps,
            guidance=args.guidance, image_guidance=args.image_guidance, resolution=args.resolution,
            jpeg_quality=args.jpeg_quality, neg_min_change=args.neg_min_change, pos_max_change=args.pos_max_change,
        )
    except ValueError as e:
        return error_exit("geco", e)

    def stage(device: str) -> ImageStage:
        editor = DiffusersImageEditor(args.model, settings, device=device, dtype=args.dtype,
                                      batch_size=args.gen_batch)
        return ImageStage(editor)

    return _run(args, stage)
