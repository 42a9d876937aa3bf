"""Zero-shot, retrieval and linear-probe evaluation: the in-training hook and `tulip-mega eval CHECKPOINT`.

`Evaluator(cfg, model).run()` evaluates the recipe's eval sets (eval.zeroshot_shards,
eval.retrieval_shards) with the model as laid out for training (any TP x PP x DP); every
rank returns the same metrics, keyed `eval/zeroshot/top1`, `eval/retrieval/image_to_text_r1`,
... The trainer calls it every eval.interval steps and at the end (tulip_mega/training/loop.py).

`evaluate_checkpoint(...)` is the standalone command: it rebuilds the model from the run's
config.yaml (beside the checkpoint folder, or --config), loads only the weights (any layout:
dist_checkpointing reshards), evaluates one task and writes a JSON file.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from pathlib import Path
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state

from dataloaders.shards import expand_shards
from dataloaders.simple_loader import SimpleLoader
from dataloaders.tokenizer import Tokenizer
from tulip_mega.config import Config, ConfigError
from tulip_mega.eval.embed import Embedder, share_from_last_stage
from tulip_mega.eval.linear_probe import linear_probe, load_probe_labels
from tulip_mega.eval.retrieval import KS, retrieval_recall
from tulip_mega.eval.zeroshot import class_embeddings, load_classes, zeroshot_accuracy
from tulip_mega.parallel.init import device

log = logging.getLogger("tulip_mega")

TASKS = ("zeroshot", "retrieval", "linear_probe")
PROBE_KEYS = ("top1", "l2", "holdout_top1", "train_samples", "samples")
ZEROSHOT_KEYS = ("top1", "top5", "samples")
RETRIEVAL_KEYS = tuple(f"{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in KS) + ("samples",)


def default_classes_path(shards: str) -> str:
    """classes.json in the folder of the first zero-shot shard (where `data synth` writes it)."""
    return str(Path(expand_shards(shards)[0]).parent / "classes.json")


class Evaluator:
    """Evaluates the recipe's eval sets with a model stage under the current megatron layout."""

    def __init__(self, cfg: Config, model, tasks: Optional[Sequence[str]] = None) -> None:
        e = cfg.eval
        available = {"zeroshot": e.zeroshot_shards, "retrieval": e.retrieval_shards,
                     "linear_probe": e.linear_probe_shards}
        self.tasks = [t for t in (tasks or TASKS) if available[t]]
        for t in tasks or ():
            if not available[t]:
                raise ConfigError(f"eval task {t!r} needs eval.{t}_shards")
        checked = {f"eval.{t}_shards": available[t] for t in self.tasks}
        if "linear_probe" in self.tasks:
            checked["eval.linear_probe_val_shards"] = e.linear_probe_val_shards
        for key, spec in checked.items():  # a wrong path must fail now, not after hours of training
            try:
                expand_shards(spec)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"{key}={spec!r}: {err}") from err
        self.cfg = cfg
        self.micro_batch = e.batch_size or cfg.train.micro_batch_size
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.first = parallel_state.is_pipeline_first_stage()
        self.embedder = Embedder(model, self.micro_batch, cfg.model.vision.image_size, cfg.model.text.context_length)
        self.tokenizer = Tokenizer(cfg.data.tokenizer, context_length=cfg.model.text.context_length)
        self.classes = None
        if "zeroshot" in self.tasks:
            self.classes = load_classes(e.classes or default_classes_path(e.zeroshot_shards))
        self.probe_labels = None
        if "linear_probe" in self.tasks:
            self.probe_labels = load_probe_labels(e.linear_probe_classes or default_classes_path(e.linear_probe_shards))

    def run(self) -> dict[str, float]:
        """Every task; metrics keyed eval/<task>/<metric> plus eval/seconds (same on every rank)."""
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        for task in self.tasks:
            metrics = getattr(self, task)()
            out.update({f"eval/{task}/{k}": v for k, v in metrics.items()})
        seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device())
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)  # identical on every rank
        out["eval/seconds"] = float(seconds)
        return out

    # --- data ----------------------------------------------------------------------------
    def _rank_cap(self) -> Optional[int]:
        """This DP rank's share of eval.max_samples (shares differ by at most one)."""
        m = self.cfg.eval.max_samples
        if m is None:
            return None
        return m // self.dp_size + (1 if self.dp_rank < m % self.dp_size else 0)

    def _shard_batches(self, shards: str, label_of, with_text: bool):
        """(images, tokens | None, labels) of this DP rank's disjoint part of `shards`, in order."""
        cap = self._rank_cap()
        if cap == 0:
            return
        loader = SimpleLoader(
            expand_shards(shards), batch_size=self.micro_batch, image_size=self.cfg.model.vision.image_size,
            tokenizer=self.tokenizer, dp_rank=self.dp_rank, dp_size=self.dp_size, seed=self.cfg.run.seed,
            shuffle_buffer=0, num_epochs=1,
        )
        seen = 0
        for batch in loader:
            n = len(batch) if cap is None else min(len(batch), cap - seen)
            labels = torch.tensor([label_of(k) for k in batch.keys[:n]], dtype=torch.long)
            yield batch.images[:n], (batch.tokens[:n] if with_text else None), labels
            seen += n
            if cap is not None and seen >= cap:
                return

    def _prompt_batches(self, prompts: list[tuple[str, int]]):
        for i in range(0, len(prompts), self.micro_batch):
            part = prompts[i : i + self.micro_batch]
            yield None, self.tokenizer.encode([p for p, _ in part]), torch.tensor([c for _, c in part])

    # --- tasks ---------------------------------------------------------------------------
    def zeroshot(self) -> dict[str, float]:
        """Top-1/top-5 accuracy of classifying the zero-shot images by their class prompts."""
        classes = self.classes
        prompts = [(p, c) for c, ps in enumerate(classes.prompts) for p in ps]
        mine = prompts[self.dp_rank :: self.dp_size]  # the prompt set is split over DP too
        text = self.embedder.embed(self._prompt_batches(mine) if self.first else None)
        images = self.embedder.embed(
            self._shard_batches(self.cfg.eval.zeroshot_shards, classes.label, with_text=False) if self.first else None
        )
        values = [0.0] * len(ZEROSHOT_KEYS)
        if images is not None:  # last stage
            class_emb = class_embeddings(text["text_emb"], text["labels"], len(classes))
            acc = zeroshot_accuracy(images["image_emb"], images["labels"], class_emb, ks=(1, 5))
            values = [acc[1], acc[5], float(images["labels"].shape[0])]
        return dict(zip(ZEROSHOT_KEYS, share_from_last_stage(values)))

    def retrieval(self) -> dict[str, float]:
        """Recall@1/5/10 image->text and text->image over the retrieval set's pairs."""
        pairs = self.embedder.embed(
            self._shard_batches(self.cfg.eval.retrieval_shards, lambda _key: 0, with_text=True)
            if self.first else None
        )
        values = [0.0] * len(RETRIEVAL_KEYS)
        if pairs is not None:
            recall = retrieval_recall(pairs["image_emb"], pairs["text_emb"], KS)
            values = [recall[k] for k in RETRIEVAL_KEYS[:-1]] + [float(pairs["labels"].shape[0])]
        return dict(zip(RETRIEVAL_KEYS, share_from_last_stage(values)))


    def linear_probe(self) -> dict[str, float]:
        """Val top-1 of a logistic regression on the frozen image embeddings of the probe's train set.

        The embedder returns each DP rank's part in turn, so the row order depends on the layout;
        rows are put in one canonical order (by crc32 of the sample key, carried with the label)
        before the probe's seeded held-out split, so every layout fits the same problem."""
        e, names = self.cfg.eval, self.probe_labels
        n_cls = len(names.names)

        def code(key: str) -> int:  # crc32(key) and the class in one non-negative int64
            return zlib.crc32(key.encode()) * n_cls + names.label(key)

        sets = [self.embedder.embed(self._shard_batches(shards, code, with_text=False) if self.first else None)
                for shards in (e.linear_probe_shards, e.linear_probe_val_shards)]
        values = [0.0] * len(PROBE_KEYS)
        if sets[0] is not None:  # last stage
            (train_x, train_y), (val_x, val_y) = [_canonical(s["image_emb"], s["labels"], n_cls) for s in sets]
            result = linear_probe(train_x, train_y, val_x, val_y, n_cls, seed=self.cfg.run.seed)
            values = [result[k] for k in PROBE_KEYS]
        return dict(zip(PROBE_KEYS, share_from_last_stage(values)))


def _canonical(features: torch.Tensor, codes: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by key hash (stable), and the class labels decoded from the codes."""
    order = torch.sort(codes, stable=True).indices
    return features[order], codes[order] % num_classes


def write_results(path: Path, metrics: dict[str, float], **context) -> None:
    """One JSON file per evaluation (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**context, "metrics": metrics}, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


# --- standalone: tulip-mega eval CHECKPOINT -----------------------------------------------
def run_config_path(checkpoint: Path) -> Path:
    """The run's resolved config.yaml: <run>/checkpoints/step_N -> <run>/config.yaml."""
    return Path(checkpoint).resolve().parent.parent / "config.yaml"


def eval_config(checkpoint: Path, task: str, data: str, classes: Optional[str] = None,
                config: Optional[str] = None, overrides: Sequence[str] = (), world_size: int = 1,
                val: Optional[str] = None) -> Config:
    """The run's recipe with the eval set swapped in; a single process runs at TP = PP = 1
    unless the overrides set a layout."""
    from tulip_mega.config import load_config

    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    recipe = Path(config) if config else run_config_path(checkpoint)
    if not recipe.is_file():
        raise ConfigError(f"no run config at {recipe}: pass --config RECIPE (the recipe the checkpoint was "
                          "trained with)")
    layout: list[str] = []
    if world_size == 1 and not any(o.startswith("parallel.") for o in overrides):
        layout = ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "parallel.sequence_parallel=false",
                  "parallel.distributed_optimizer=false"]
    # --classes or the classes.json beside the shards, never the training run's eval.classes
    task_keys = [f"eval.{task}_shards={data}", f"eval.classes={classes or 'null'}",
                 f"eval.linear_probe_classes={classes or 'null'}", "eval.interval=0",
                 "model.init_from_hf=null", "model.init_from_open_clip=null"]
    if task == "linear_probe":
        if not val:
            raise ConfigError("--task linear_probe needs --val VAL_SHARDS (top-1 is reported on them; --data are "
                              "the shards the probe is fitted on)")
        task_keys.append(f"eval.linear_probe_val_shards={val}")
    others = [f"eval.{t}_shards=null" for t in TASKS if t != task]
    if task != "linear_probe":
        others.append("eval.linear_probe_val_shards=null")
    return load_config(str(recipe), layout + others + task_keys + list(overrides))


def load_weights(checkpoint: Path, module, model_config: dict) -> None:
    """Only the model's weights from a training checkpoint, into this rank's stage (any layout)."""
    from megatron.core import dist_checkpointing

    from tulip_mega.training.checkpoint import CheckpointError, check_model_config

    checkpoint = Path(checkpoint)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(checkpoint)):
        raise CheckpointError(f"{checkpoint} is not a dist_checkpointing checkpoint (no metadata.json)")
    common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    check_model_config(checkpoint, common.get("model_config", {}), model_config)
    loaded = dist_checkpointing.load({"model": module.sharded_state_dict()}, str(checkpoint))
    module.load_state_dict(loaded["model"])


def evaluate_checkpoint(checkpoint: str, task: str, data: str, classes: Optional[str] = None,
                        config: Optional[str] = None, overrides: Sequence[str] = (),
                        out: Optional[str] = None, val: Optional[str] = None) -> dict:
    """Evaluate `checkpoint` on one task; every rank returns {"metrics": ..., "out": json path}.

    Launch like training (single process, torchrun or srun); the layout is the recipe's (or
    TP = PP = 1 in a single process) and need not match the one the checkpoint was saved with.
    """
    from tulip_mega.config import validate_layout
    from tulip_mega.models.build import build_model
    from tulip_mega.parallel.init import check_runtime_support, init_parallel, launch_env
    from tulip_mega.training.loop import model_shape
    from tulip_mega.training.metrics import setup_logging

    env = launch_env()
    checkpoint_path = Path(checkpoint)
    cfg = eval_config(checkpoint_path, task, data, classes, config, overrides, env.world_size, val)
    validate_layout(cfg, env.world_size)
    check_runtime_support(cfg)
    setup_logging(env.rank)
    if parallel_state.model_parallel_is_initialized():  # a caller evaluating several checkpoints
        parallel_state.destroy_model_parallel()
    init_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.run.seed, env)
    model = build_model(cfg)
    load_weights(checkpoint_path, model, model_shape(cfg))
    metrics = Evaluator(cfg, model, tasks=[task]).run()
    if out is None:
        run = checkpoint_path.resolve().parent.parent
        out = str(run / "eval" / f"{checkpoint_path.name}_{task}.json")
    if env.rank == 0:
        write_results(Path(out), metrics, checkpoint=str(checkpoint_path), task=task, data=data, val=val,
                      layout=[cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                              parallel_state.get_data_parallel_world_size()])
        for k, v in metrics.items():
            log.info("%s = %.4f", k, v)
        log.info("results: %s", Path(out).resolve())
    return {"metrics": metrics, "out": out}


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
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--data", required=True, help="eval shards: brace range, glob or folder "
                                                 "(linear_probe: the shards the probe is fitted on)")
    p.add_argument("--val", default=None, help="linear_probe: the shards top-1 is reported on")
    p.add_argument("--classes", default=None, help="zeroshot / linear_probe: classes.json (default: beside --data)")
    p.add_argument("--config", default=None, help="the run's recipe (default: <run>/config.yaml beside checkpoints/)")
    p.add_argument("--out", default=None, help="results JSON (default: <run>/eval/<checkpoint>_<task>.json)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`tulip-mega eval`: exit 0 done, 2 config/data error, 3 checkpoint error."""
    import sys

    from tulip_mega.training.checkpoint import CheckpointError

    args = build_parser().parse_intermixed_args(argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.task, args.data, args.classes, args.config,
                                     args.overrides, args.out, val=args.val)
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
