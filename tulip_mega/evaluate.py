"""`tulip-mega eval CHECKPOINT`: evaluate a training checkpoint on one task.

`--task scenes` (evaluate_scenes_checkpoint) exports the checkpoint to a plain PyTorch model and
runs the scenes benchmark (tulip_mega/eval/scenes.py) in a single process.

`evaluate_checkpoint(...)` rebuilds the model from the run's config.yaml (beside the
checkpoint folder, or --config), loads only the weights (any layout: dist_checkpointing
reshards), runs tulip_mega.eval.runner.Evaluator on one task (its set in any format of
tulip_mega/eval/formats.py, --format) and writes a JSON file. `evaluate_suite(...)`
(--benchmarks) runs the named sets of a suite file (tulip_mega/eval/suite.py) with one model
load and writes one JSON and a markdown table. It lives
outside tulip_mega/eval so that the eval package never imports the trainer (which imports it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

from megatron.core import parallel_state

from tulip_mega.config import Config, ConfigError
from tulip_mega.eval.runner import DATA_KEYS, TASKS, Evaluator, write_results
from tulip_mega.training.checkpoint import (
    CheckpointError,
    check_model_config,
    checkpoint_keys,
    match_checkpoint_names,
    model_shape,
    reader_overrides,
    restore_own_extra_state,
)

log = logging.getLogger("tulip_mega")


def run_config_path(checkpoint: Path) -> Path:
    """The run's resolved config.yaml: <run>/checkpoints/step_N -> <run>/config.yaml."""
    return Path(checkpoint).resolve().parent.parent / "config.yaml"


def eval_config(checkpoint: Path, task: str, data: str, classes: Optional[str] = None,
                config: Optional[str] = None, overrides: Sequence[str] = (), world_size: int = 1,
                val: Optional[str] = None, fmt: Optional[str] = None, templates: Optional[str] = None,
                split: Optional[str] = None) -> Config:
    """The run's recipe with the eval set swapped in; a single process runs at TP = PP = 1
    unless the overrides set a layout."""
    from tulip_mega.config import load_config

    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    recipe = Path(config) if config else run_config_path(checkpoint)
    if not recipe.is_file():
        raise ConfigError(f"no run config at {recipe}: pass --config RECIPE (the recipe the checkpoint was "
                          "trained with)")
    # No optimizer is built; a TE run's recipe evaluates where TE is absent (local layers).
    layout: list[str] = reader_overrides(builds_optimizer=False)
    if world_size == 1 and not any(o.startswith("parallel.") for o in overrides):
        layout += ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "parallel.virtual_pipeline=1",
                   "parallel.sequence_parallel=false"]
    # --classes or the classes.json beside the shards, never the training run's eval.classes
    task_keys = [f"eval.{DATA_KEYS[task]}={data}", f"eval.classes={classes or 'null'}",
                 f"eval.linear_probe_classes={classes or 'null'}", "eval.interval=0",
                 "model.init_from_hf=null", "model.init_from_open_clip=null"]
    if task == "linear_probe":
        if not val and fmt == "clip_benchmark":
            val = data  # its splits: train (fitted on) and eval.split (reported on)
        if not val:
            raise ConfigError("--task linear_probe needs --val VAL_SHARDS (top-1 is reported on them; --data are "
                              "the shards the probe is fitted on)")
        task_keys.append(f"eval.linear_probe_val_shards={val}")
    task_keys += format_keys(task, fmt, templates, split)
    others = [f"eval.{DATA_KEYS[t]}=null" for t in TASKS if t != task]
    if task != "linear_probe":
        others.append("eval.linear_probe_val_shards=null")
    return load_config(str(recipe), layout + others + task_keys + list(overrides))


def format_keys(task: str, fmt: Optional[str], templates: Optional[str], split: Optional[str]) -> list[str]:
    """Recipe overrides for --format / --templates / --split (formats: tulip_mega/eval/formats.py)."""
    if fmt is None:
        fmt = {"zeroshot": "classes_json", "retrieval": "pairs", "linear_probe": "classes_json"}.get(task)
    elif task not in ("zeroshot", "retrieval", "linear_probe"):
        raise ConfigError(f"--format applies to --task zeroshot, retrieval or linear_probe, not {task!r}")
    keys = ["eval.zeroshot_format=classes_json", "eval.retrieval_format=pairs", "eval.linear_probe_format=classes_json"]
    if task in ("zeroshot", "retrieval", "linear_probe"):
        keys.append(f"eval.{task}_format={fmt}")
    keys.append(f"eval.zeroshot_templates={templates or 'null'}")
    if split:
        keys.append(f"eval.split={split}")
    return keys


def load_weights(checkpoint: Path, parts: list, model_config: dict) -> None:
    """Only the model's weights from a training checkpoint, into this rank's model parts (one
    per virtual stage; any layout: tensors are keyed globally, whatever the layout that saved
    them; Transformer Engine or local layer names, whichever wrote it)."""
    from megatron.core import dist_checkpointing

    checkpoint = Path(checkpoint)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(checkpoint)):
        raise CheckpointError(f"{checkpoint} is not a dist_checkpointing checkpoint (no metadata.json)")
    common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    check_model_config(checkpoint, common.get("model_config", {}), model_config)
    state = {f"model{i}": m.sharded_state_dict() for i, m in enumerate(parts)}
    own = match_checkpoint_names(state, checkpoint_keys(checkpoint), checkpoint)
    loaded = dist_checkpointing.load(state, str(checkpoint))
    restore_own_extra_state(loaded, own)
    for i, m in enumerate(parts):
        m.load_state_dict(loaded[f"model{i}"])


def load_eval_model(cfg: Config, checkpoint: Path, env) -> list:
    """Check the launch (`tulip_mega.launch.check_launch`), initialise megatron's parallel state
    and build this rank's model parts holding the checkpoint's weights."""
    from tulip_mega.launch import check_launch
    from tulip_mega.models.build import build_model_chunks
    from tulip_mega.parallel.init import init_parallel
    from tulip_mega.training.metrics import setup_logging

    layout = check_launch(cfg, env.world_size)
    setup_logging(env.rank)
    if parallel_state.model_parallel_is_initialized():  # a caller evaluating several checkpoints
        parallel_state.destroy_model_parallel()
    init_parallel(layout.tensor_parallel, layout.pipeline_parallel, cfg.run.seed, env,
                  virtual_pipeline=layout.virtual_pipeline)
    parts = build_model_chunks(cfg, layout)
    load_weights(checkpoint, parts, model_shape(cfg))
    return parts


def evaluate_suite(checkpoint: str, benchmarks: str, root: str, suite: Optional[str] = None,
                   config: Optional[str] = None, overrides: Sequence[str] = (), out: Optional[str] = None) -> dict:
    """The named benchmarks of a suite (tulip_mega/eval/suite.py) with one model load; every
    rank returns {"results": {name: ...}, "out": json path, "table": markdown}. A set that is
    not there is reported (where it was expected, in which format) and the others run."""
    from tulip_mega.eval.suite import load_suite, markdown_table, select, write_suite_results
    from tulip_mega.parallel.init import launch_env

    env = launch_env()
    checkpoint_path = Path(checkpoint)
    chosen = select(load_suite(suite), benchmarks, root)
    results: dict[str, dict] = {}
    parts = None
    for b in chosen:
        missing = b.missing()
        if missing:
            log.warning("%s", missing)
            results[b.name] = {"task": b.task, "format": b.format, "path": b.path, "missing": missing}
            continue
        fmt = None if b.format == "mmvp" else b.format
        data, val = b.path, None
        if b.task == "linear_probe" and b.format == "imagefolder":
            data, val = str(Path(b.path) / "train"), str(Path(b.path) / "val")
        cfg = eval_config(checkpoint_path, b.task, data, None, config, overrides, env.world_size, val=val, fmt=fmt,
                          templates=b.templates, split=b.split)
        if parts is None:
            parts = load_eval_model(cfg, checkpoint_path, env)
        log.info("benchmark %s (%s, %s): %s", b.name, b.task, b.format, b.path)
        results[b.name] = {"task": b.task, "format": b.format, "path": b.path,
                           "metrics": Evaluator(cfg, parts, tasks=[b.task]).run()}
    if out is None:
        out = str(checkpoint_path.resolve().parent.parent / "eval" / f"{checkpoint_path.name}_suite.json")
    if env.rank == 0:
        table = write_suite_results(Path(out), results, checkpoint=str(checkpoint_path), root=root)
        log.info("results: %s, table: %s", Path(out).resolve(), table.resolve())
    return {"results": results, "out": out, "table": markdown_table(results)}


def evaluate_checkpoint(checkpoint: str, task: str, data: str, classes: Optional[str] = None,
                        config: Optional[str] = None, overrides: Sequence[str] = (),
                        out: Optional[str] = None, val: Optional[str] = None, fmt: Optional[str] = None,
                        templates: Optional[str] = None, split: Optional[str] = None) -> dict:
    """Evaluate `checkpoint` on one task; every rank returns {"metrics": ..., "out": json path}.

    Launch like training (single process, torchrun or srun); the layout is the recipe's (or
    TP = PP = 1 in a single process) and need not match the one the checkpoint was saved with.
    """
    from tulip_mega.parallel.init import launch_env

    env = launch_env()
    checkpoint_path = Path(checkpoint)
    cfg = eval_config(checkpoint_path, task, data, classes, config, overrides, env.world_size, val, fmt, templates,
                      split)
    parts = load_eval_model(cfg, checkpoint_path, env)
    metrics = Evaluator(cfg, parts, tasks=[task]).run()
    if out is None:
        run = checkpoint_path.resolve().parent.parent
        out = str(run / "eval" / f"{checkpoint_path.name}_{task}.json")
    if env.rank == 0:
        write_results(Path(out), metrics, checkpoint=str(checkpoint_path), task=task, data=data, val=val,
                      format={"zeroshot": cfg.eval.zeroshot_format, "retrieval": cfg.eval.retrieval_format}.get(task),
                      layout=[cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                              parallel_state.get_data_parallel_world_size()])
        for k, v in metrics.items():
            log.info("%s = %.4f", k, v)
        log.info("results: %s", Path(out).resolve())
    return {"metrics": metrics, "out": out}


def evaluate_scenes_checkpoint(checkpoint: str, data: str, config: Optional[str] = None,
                               tokenizer: Optional[str] = None, out: Optional[str] = None,
                               seed: int = 0) -> dict:
    """The scenes benchmark (tulip_mega/eval/scenes.py) of a checkpoint, single process.

    The checkpoint (any layout) is exported to a plain PyTorch model in a temporary folder (as
    `tulip-mega convert --to pytorch` does), which embeds the scenes set in `data` (the folder
    `tulip-mega data synth --kind scenes` wrote); a checkpoint with a LocCa decoder also gets
    the referring-expression metrics (tulip_mega/eval/locca.py). Results go to <run>/eval/<checkpoint>_scenes.json. The tokenizer is the
    run config's data.tokenizer unless given. Returns {"metrics": ..., "out": json path}."""
    import tempfile

    from tulip_mega.config import load_config
    from tulip_mega.convert.plain import convert_checkpoint
    from tulip_mega.eval.scenes import plain_model_metrics
    from tulip_mega.parallel.init import launch_env

    if launch_env().world_size > 1:
        raise ConfigError("--task scenes runs in a single process (it evaluates an exported plain model); "
                          "launch it without torchrun")
    checkpoint_path = Path(checkpoint)
    if tokenizer is None:
        recipe = Path(config) if config else run_config_path(checkpoint_path)
        if not recipe.is_file():
            raise ConfigError(f"no run config at {recipe}: pass --config RECIPE or --tokenizer")
        tokenizer = load_config(str(recipe)).data.tokenizer
    with tempfile.TemporaryDirectory() as plain:
        convert_checkpoint(checkpoint_path, Path(plain), log=lambda _msg: None)
        metrics = plain_model_metrics(plain, data, tokenizer, seed=seed)
    if any(k.startswith("locca_decoder.") for k in checkpoint_keys(checkpoint_path)):
        recipe = Path(config) if config else run_config_path(checkpoint_path)
        metrics.update(locca_refer_metrics(checkpoint_path, data, str(recipe), tokenizer))
    if out is None:
        out = str(checkpoint_path.resolve().parent.parent / "eval" / f"{checkpoint_path.name}_scenes.json")
    write_results(Path(out), metrics, checkpoint=str(checkpoint_path), task="scenes", data=data)
    return {"metrics": metrics, "out": out}


def locca_refer_metrics(checkpoint: Union[str, Path], data_dir: Union[str, Path], recipe: str,
                        tokenizer_path: str) -> dict[str, float]:
    """`refer_metrics` of a training checkpoint that holds a LocCa decoder, on the scenes val
    split in `data_dir`: the model is rebuilt in this process (TP = PP = 1, any saved layout).
    Without a process group it makes a one-rank group on a free port of its own (the default
    one may belong to a training run on this machine) and ends it, restoring the environment."""
    import gc
    import os

    import torch.distributed as dist

    from tulip_mega.config import load_config
    from tulip_mega.data.tokenizer import Tokenizer
    from tulip_mega.eval.locca import refer_metrics
    from tulip_mega.losses.locca import LoccaVocab
    from tulip_mega.models.specs import overrides_where_te_absent
    from tulip_mega.parallel.init import launch_env
    from tulip_mega.parallel.spawn import free_port

    single = ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "parallel.virtual_pipeline=1",
              "parallel.sequence_parallel=false", "checkpoint.load=null", "checkpoint.resume=false"]
    cfg = load_config(recipe, overrides_where_te_absent() + single)
    started = not dist.is_initialized()
    saved = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    if started:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        model = load_eval_model(cfg, Path(checkpoint), launch_env())[0].eval()
        tok = Tokenizer(tokenizer_path, context_length=cfg.model.text.context_length)
        vocab = LoccaVocab(cfg.model.text.vocab_size, cfg.loss.locca.box_bins)
        return refer_metrics(model, str(Path(data_dir) / "val-*.tar"), cfg.model.vision.image_size, tok, vocab)
    finally:
        if started:
            if dist.is_initialized():
                parallel_state.destroy_model_parallel()
                dist.destroy_process_group()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            gc.collect()  # the group's TCP store, and with it the port


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="tulip-mega eval",
        description="Evaluate a training checkpoint: zero-shot classification, image-text retrieval or a linear "
                    "probe (logistic regression on frozen image features). "
                    "Runs single-process or under torchrun/srun (any TP x PP x DP layout via overrides).",
    )
    p.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/tiny_cpu/checkpoints/step_0000200")
    p.add_argument("overrides", nargs="*", help="recipe overrides key.path=value (e.g. parallel.tensor_parallel=2)")
    p.add_argument("--benchmarks", default=None,
                   help="run a suite's benchmarks instead of one --task: NAME[,NAME...] or all (with --root; "
                        "the suite is --suite or tulip_mega/eval/suites/tulip_paper.yaml); one JSON + a markdown "
                        "table; see docs/evaluation.md")
    p.add_argument("--root", default=None, help="--benchmarks: the folder the suite's paths are under")
    p.add_argument("--suite", default=None, help="--benchmarks: a suite YAML (default: the TULIP paper suite)")
    p.add_argument("--task", choices=[*TASKS, "scenes"], default=None,
                   help="scenes: the vision-centric benchmark (per-attribute zero-shot, MMVP-style pairs, linear "
                        "probes) on a `data synth --kind scenes` folder; single process")
    p.add_argument("--data", default=None, help="eval shards: brace range, glob or folder "
                                                 "(linear_probe: the shards the probe is fitted on; "
                                                 "scenes: the scenes folder; clip_benchmark: the set's root; "
                                                 "imagefolder / imagenet: the folder of class folders; "
                                                 "mmvp: the MMVP-VLM folder)")
    p.add_argument("--tokenizer", default=None, help="scenes: SentencePiece model (default: the run's data.tokenizer)")
    p.add_argument("--format", dest="fmt", default=None,
                   choices=sorted({"classes_json", "clip_benchmark", "imagefolder", "imagenet", "pairs"}),
                   help="zeroshot: classes_json (default), clip_benchmark, imagefolder or imagenet; retrieval: pairs "
                        "(default) or clip_benchmark (several captions per image, COCO protocol); linear_probe: "
                        "classes_json (default), clip_benchmark or imagefolder; "
                        "see docs/evaluation.md")
    p.add_argument("--templates", default=None, help="zeroshot prompts for clip_benchmark / imagefolder / imagenet: "
                                                     "openai, siglip or a file of '{c}' templates")
    p.add_argument("--split", default=None, help="clip_benchmark sets: the split folder (default test)")
    p.add_argument("--val", default=None, help="linear_probe: the shards (imagefolder: the folder) top-1 is reported "
                                               "on; clip_benchmark: default --data (its split --split, default test; "
                                               "fitted on its train split)")
    p.add_argument("--classes", default=None, help="zeroshot / linear_probe: classes.json (default: beside --data)")
    p.add_argument("--config", default=None, help="the run's recipe (default: <run>/config.yaml beside checkpoints/)")
    p.add_argument("--out", default=None, help="results JSON (default: <run>/eval/<checkpoint>_<task>.json)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`tulip-mega eval`: exit 0 done, 2 config/data error, 3 checkpoint error."""
    import sys

    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.benchmarks is None and (args.task is None or args.data is None):
        parser.error("give --task and --data, or --benchmarks with --root")
    if args.benchmarks is not None and (args.root is None or args.task is not None):
        parser.error("--benchmarks needs --root and takes the tasks from the suite (no --task)")
    try:
        if args.benchmarks is not None:
            result = evaluate_suite(args.checkpoint, args.benchmarks, args.root, args.suite, args.config,
                                    args.overrides, args.out)
            from tulip_mega.parallel.init import destroy_parallel, launch_env

            if launch_env().rank == 0:
                print(result["table"], end="")
            destroy_parallel()
            return 0
        if args.task == "scenes":
            result = evaluate_scenes_checkpoint(args.checkpoint, args.data, args.config, args.tokenizer, args.out)
            print(json.dumps(result["metrics"], indent=1, sort_keys=True))
            return 0
        result = evaluate_checkpoint(args.checkpoint, args.task, args.data, args.classes, args.config,
                                     args.overrides, args.out, val=args.val, fmt=args.fmt,
                                     templates=args.templates, split=args.split)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"tulip-mega: eval error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"tulip-mega: checkpoint error: {e}", file=sys.stderr)
        return 3
    from tulip_mega.parallel.init import destroy_parallel, launch_env

    if launch_env().rank == 0:
        print(json.dumps(result["metrics"], indent=1, sort_keys=True))
    destroy_parallel()
    return 0
