"""Quality of SigLIP vs clip-rocket vs TULIP vs SigLIP 2 on the vision-centric scenes set, at equal steps.

Trains the tiny SigLIP (recipes/tiny_cpu.yaml), clip-rocket (recipes/clip_rocket_tiny_cpu.yaml),
full-TULIP (recipes/tiny_tulip_cpu.yaml), SigLIP 2 (recipes/siglip2_tiny_cpu.yaml: LocCa decoder,
EMA-teacher terms in the last 20%) and TULIP + SigLIP 2 (the TULIP recipe with SigLIP 2's terms
added, `SIGLIP2_TERMS`) recipes on `tulip-mega data synth --kind scenes`
for the same number of steps, each with several seeds (run.seed), single process (TP = PP = 1),
evaluates every final checkpoint with tulip_mega/eval/scenes.py (zero-shot per attribute,
MMVP-style pairs, linear probes) and prints one table: every metric as mean +/- std over seeds,
its chance level, and each recipe's mean as a ratio to SigLIP's. Recipes with a LocCa decoder
also get the referring-expression accuracy at IoU 0.5 (tulip_mega/eval/locca.py); the others
show n/a there. `--equal-compute` gives every recipe the training FLOPs of SigLIP's `--steps`
(per-sample model FLOPs from tulip_mega.flops, the EMA teacher's part counted for the steps it
runs) instead of the same number of steps.

The recipes are read at run time: only data paths, seed, steps, the batch (the same for every
recipe: 32 pairs in micro-batches of 8, so equal steps are equal samples), the text context (16
tokens for every recipe: the scenes set's longest text and its EOS), the layout, the run
folder and eval/checkpoint plumbing are overridden (and the warm-up, only when --steps is below
it), so a change to a recipe's other learning settings shows up here.

    python benchmarks/quality.py                 # 3 seeds x 3 recipes x 100 steps (~6 min on 2 cores)
    python benchmarks/quality.py --quick         # CI smoke run: 1 seed, 8 steps, small data

Each finished run's metrics are kept in its run folder (runs/<recipe>_seed<N>/scenes_metrics.json)
with a key of the recipe's text, the overrides and the steps, and results.json is rewritten after
every run, so an interrupted benchmark restarted with the same --out only trains what is missing
(and what a recipe change made stale).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"siglip": "recipes/tiny_cpu.yaml", "clip_rocket": "recipes/clip_rocket_tiny_cpu.yaml",
           "tulip": "recipes/tiny_tulip_cpu.yaml", "siglip2": "recipes/siglip2_tiny_cpu.yaml",
           "tulip_siglip2": "recipes/tiny_tulip_cpu.yaml"}
# SigLIP 2's terms on top of the TULIP recipe, sized as in recipes/siglip2_tiny_cpu.yaml.
SIGLIP2_TERMS = ("loss.weights.locca=1", "loss.locca.box_bins=32", "model.locca_decoder.num_layers=2",
                 "loss.weights.self_distill=1", "loss.weights.masked_prediction=0.25",
                 "loss.distill.prototypes=256", "loss.distill.head_hidden=128", "loss.distill.head_bottleneck=64")
EXTRA = {"tulip_siglip2": SIGLIP2_TERMS}
BASELINE = "siglip"
# Every recipe trains on the same number of samples per step (the tiny TULIP / clip-rocket
# recipes' batch; the quickstart's tiny_cpu uses 64).
EQUAL_BATCH = ("train.global_batch_size=32", "train.micro_batch_size=8")
# ... and the same text context, one that holds the scenes set's longest text (15 tokens + EOS):
# the text tower pools its last position with no padding mask, and padding to the towers' 64
# tokens let the padding drown single words out of it (recipes/tiny_cpu.yaml says more).
EQUAL_TEXT = ("model.text.context_length=16",)


def make_data(out: Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    """The scenes set and a tokenizer on its captions (reused when already written)."""
    from tulip_mega.datagen.synthetic_scenes import write_scenes_dataset
    from tulip_mega.data.tokenizer import train_tokenizer_from_shards

    done = out / "done.json"
    want = {"num_train": num_train, "num_val": num_val, "seed": seed}
    if done.is_file() and json.loads(done.read_text()) == want:
        return out
    write_scenes_dataset(str(out), num_train=num_train, num_val=num_val, seed=seed)
    train_tokenizer_from_shards(str(out / "train-*.tar"), str(out / "tokenizer"))
    done.write_text(json.dumps(want))
    return out


def run_key(recipe: str, steps: int, extra: tuple[str, ...] = ()) -> str:
    """What a finished run's metrics are valid for: the recipe file's text, the overrides every
    run gets and the steps. A run kept from before a recipe changed is trained again."""
    text = (ROOT / recipe).read_text() + repr((EQUAL_BATCH, EQUAL_TEXT, steps, extra))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_overrides(data: Path, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    """What every single-process benchmark run of a recipe is given besides its seed and run folder."""
    return [*extra, "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
            f"data.train_shards={data}/train-*.tar", f"data.tokenizer={data}/tokenizer.model",
            f"train.steps={steps}", *EQUAL_BATCH, *EQUAL_TEXT]


def flops_per_run(recipe: str, data: Path, steps: int, extra: tuple[str, ...] = ()) -> float:
    """Training FLOPs of a whole run per sample-step (tulip_mega.flops: every view, text, decoder
    and, from its start, the EMA teacher): the unit of the equal-compute comparison."""
    from tulip_mega.config import load_config
    from tulip_mega.flops import model_flops_between
    from tulip_mega.launch import resolve_layout

    cfg = load_config(str(ROOT / recipe), run_overrides(data, steps, extra) + ["optim.warmup_steps=0"])
    return steps * model_flops_between(cfg, resolve_layout(cfg, 1), 0, steps)


def equal_compute_steps(base: str, recipe: str, data: Path, steps: int, extra: tuple[str, ...] = ()) -> int:
    """The steps at which `recipe` spends the FLOPs `base` spends in `steps` (equal batch, so the
    ratio of per-sample FLOPs; the teacher's share depends on the steps, so it is solved by search)."""
    budget = flops_per_run(RECIPES[base], data, steps)
    lo, hi = 1, steps * 4
    while lo < hi:  # the largest n with flops(n) <= budget
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if flops_per_run(recipe, data, mid, extra) <= budget else (lo, mid - 1)
    return lo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_run(recipe: str, data: Path, run_dir: Path, seed: int, steps: int, extra: tuple[str, ...] = ()) -> Path:
    """Train one recipe (with the `extra` overrides) single-process; returns its final checkpoint folder."""
    from tulip_mega.config import load_config

    warmup = load_config(str(ROOT / recipe), list(extra)).optim.warmup_steps
    overrides = [
        *run_overrides(data, steps, extra), f"run.seed={seed}",
        f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}",
        "eval.interval=0", "eval.zeroshot_shards=null", "eval.retrieval_shards=null",
        "eval.linear_probe_shards=null", "eval.linear_probe_val_shards=null",
        "checkpoint.interval=0", "checkpoint.resume=false",
    ]
    if steps <= warmup:  # megatron's scheduler needs warm-up < steps (only --quick gets here)
        overrides.append(f"optim.warmup_steps={steps // 4}")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "tulip_mega.train", str(ROOT / recipe), *overrides],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training {recipe} (seed {seed}) failed with exit code {proc.returncode}; "
                           f"see {run_dir / 'train.log'}")
    return run_dir / "checkpoints" / f"step_{steps:07d}"


def evaluate(checkpoint: Path, data: Path, seed: int) -> dict[str, float]:
    """`tulip-mega eval CHECKPOINT --task scenes`, in this process."""
    # megatron-core's import-time notices (no TE/apex on a CPU) and checkpoint-API deprecations.
    for pattern in (".*(Transformer Engine|Apex).*not installed.*", ".*(deprecat|DTensor).*"):
        warnings.filterwarnings("ignore", message=pattern)
    from tulip_mega.evaluate import evaluate_scenes_checkpoint

    return evaluate_scenes_checkpoint(str(checkpoint), str(data), tokenizer=str(data / "tokenizer.model"),
                                      seed=seed)["metrics"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table: metric, chance, mean +/- std per recipe, ratio to the baseline per recipe."""
    from tulip_mega.eval.scenes import headline

    names = [n for n in results if results[n]]
    keys = list(dict.fromkeys(k for n in names for k in headline(results[n][0])))  # a LocCa recipe adds rows
    others = [n for n in names if n != BASELINE]
    head = ["metric", "chance", *names, *[f"{n}/{BASELINE}" for n in others]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        stats = {n: _mean_std([r[key] for r in results[n]]) for n in names if key in results[n][0]}
        chance = next((results[n][0][f"{key}_chance"] for n in names if f"{key}_chance" in results[n][0]), None)
        row = [key, f"{chance:.3f}" if chance is not None else ""]
        row += [f"{stats[n][0]:.3f} ± {stats[n][1]:.3f}" if n in stats else "n/a" for n in names]
        base = stats[BASELINE][0] if BASELINE in stats else float("nan")
        row += [f"{stats[n][0] / base:.2f}" if n in stats and base > 0 else "n/a" for n in others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 8 steps, 512/64 samples")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 100; quick 8)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per recipe (default 3; quick 1)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {', '.join(RECIPES)}")
    p.add_argument("--out", default=str(ROOT / "runs" / "quality"), help="work folder (data, runs, results)")
    p.add_argument("--equal-compute", action="store_true",
                   help=f"every recipe gets the training FLOPs of {BASELINE} at --steps, not the same steps")
    args = p.parse_args(argv)
    steps = args.steps or (8 if args.quick else 100)
    seeds = args.seeds or (1 if args.quick else 3)
    num_train, num_val = (512, 64) if args.quick else (4096, 512)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    out = Path(args.out) / ("quick" if args.quick else "full") / ("equal_compute" if args.equal_compute else "")
    t0 = time.perf_counter()
    data = make_data(out / "data", num_train, num_val)
    print(f"data: {data} ({num_train} train / {num_val} val scenes), {time.perf_counter() - t0:.0f} s", flush=True)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    budget = {n: (equal_compute_steps(BASELINE, RECIPES[n], data, steps, EXTRA.get(n, ())) if args.equal_compute
                  else steps) for n in names}
    if args.equal_compute:
        print("equal compute: steps " + ", ".join(f"{n} {budget[n]}" for n in names), flush=True)
    load_start = os.getloadavg()
    for seed in range(seeds):
        for name in names:
            run_dir = out / "runs" / f"{name}_seed{seed}"
            cached = run_dir / "scenes_metrics.json"
            t = time.perf_counter()
            key = run_key(RECIPES[name], budget[name], EXTRA.get(name, ()))
            if cached.is_file() and json.loads(cached.read_text()).get("key") == key:  # a finished run of this recipe
                metrics = json.loads(cached.read_text())["metrics"]
                note = "reused"
            else:
                ckpt = train_run(RECIPES[name], data, run_dir, seed, budget[name], EXTRA.get(name, ()))
                t_train = time.perf_counter() - t
                metrics = evaluate(ckpt, data, seed)
                cached.write_text(json.dumps({"steps": budget[name], "key": key, "metrics": metrics}, indent=1))
                note = f"train {t_train:.0f} s, eval {time.perf_counter() - t - t_train:.0f} s"
            results[name].append(metrics)
            print(f"{name} seed {seed}: {note}; pairs/all {metrics['pairs/all']:.3f}, "
                  f"probe/count {metrics['probe/count']:.3f}", flush=True)
            wall = time.perf_counter() - t0
            (out / "results.json").write_text(json.dumps({  # after every run: a cut-short benchmark keeps its part
                "steps": budget, "seeds_done": min(len(r) for r in results.values()), "wall_s": wall,
                "num_train": num_train, "num_val": num_val, "loadavg_start": load_start,
                "loadavg_end": os.getloadavg(), "results": results}, indent=1))
    text = table(results)
    print(f"\n{len(names)} recipes x {seeds} seeds x {steps} steps, single process; wall {wall / 60:.1f} min; "
          f"load average (1/5/15 min) {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    print(text)
    (out / "table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
