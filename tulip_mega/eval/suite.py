"""Benchmark suites: a small YAML naming each set's task, format and path, and the results table.

A suite file (tulip_mega/eval/suites/*.yaml, or any file given by --suite):

    benchmarks:
      imagenet:  {task: zeroshot, format: imagenet, path: imagenet/val, templates: openai}
      coco:      {task: retrieval, format: clip_benchmark, path: wds_mscoco_captions}
      mmvp:      {task: mmvp, path: MMVP_VLM}

Paths are relative to `--root`. `tulip-mega eval CHECKPOINT --benchmarks imagenet,coco --root DIR`
runs the named ones (every one with `--benchmarks all`); a set that is not there is reported
with where it was expected and in which format, and the others still run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from tulip_mega.config import ConfigError

SUITES = Path(__file__).resolve().parent / "suites"
DEFAULT_SUITE = SUITES / "tulip_paper.yaml"
FORMATS = {"zeroshot": ("classes_json", "clip_benchmark", "imagefolder", "imagenet"),
           "retrieval": ("pairs", "clip_benchmark"), "mmvp": ("mmvp",),
           "linear_probe": ("clip_benchmark", "imagefolder")}
DEFAULT_FORMAT = {"zeroshot": "classes_json", "retrieval": "pairs", "mmvp": "mmvp", "linear_probe": "clip_benchmark"}
# The columns of the markdown table, per task (metric key under eval/<task>/, header).
HEADLINE = {"zeroshot": (("top1", "top-1"), ("top5", "top-5")),
            "retrieval": (("text_to_image_r1", "T→I R@1"), ("image_to_text_r1", "I→T R@1"),
                          ("text_to_image_r5", "T→I R@5"), ("image_to_text_r5", "I→T R@5")),
            "mmvp": (("average", "average"),), "linear_probe": (("top1", "probe top-1"),)}
LAYOUT_HINT = {
    "clip_benchmark": "<path>/<split>/nshards.txt + <path>/<split>/0.tar ... (CLIP_benchmark webdataset)",
    "imagefolder": "<path>/<class>/<image> (ImageFolder)",
    "imagenet": "<path>/<wnid>/<image>, 1000 WordNet-id folders (ImageNet-1k val)",
    "mmvp": "<path>/Questions.csv + <path>/MMVP_VLM_Images/<pattern>/<qid>.jpg (MMVP-VLM)",
    "classes_json": "shards at <path> + classes.json beside them",
    "pairs": "shards at <path>, one caption per sample",
}


@dataclass(frozen=True)
class Benchmark:
    """One set of a suite, its path resolved against --root."""

    name: str
    task: str
    format: str
    path: str
    templates: Optional[str] = None
    split: str = "test"

    def missing(self) -> Optional[str]:
        """None when the set is there; else where it was expected and in which layout."""
        p = Path(self.path)
        if self.task == "linear_probe":  # clip_benchmark: train + test splits; imagefolder: train/ + val/
            parts = ("train", self.split) if self.format == "clip_benchmark" else ("train", "val")
            inner = "nshards.txt" if self.format == "clip_benchmark" else ""
            ok = all((p / part / inner).exists() for part in parts)
        elif self.format == "clip_benchmark":
            ok = (p / self.split / "nshards.txt").is_file()
        elif self.format in ("imagefolder", "imagenet"):
            ok = p.is_dir()
        elif self.format == "mmvp":
            ok = (p / "Questions.csv").is_file()
        else:
            from tulip_mega.data.shards import expand_shards

            try:
                ok = bool(expand_shards(self.path))
            except (FileNotFoundError, ValueError):
                ok = False
        if ok:
            return None
        hint = LAYOUT_HINT[self.format]
        if self.task == "linear_probe":
            hint = ("<path>/train/ and <path>/" + (f"{self.split}/" if self.format == "clip_benchmark" else "val/")
                    + f", each {hint.split(' (')[0].replace('<path>/<split>/', '').replace('<path>/', '')}")
        return f"{self.name}: not found at {self.path} (expected {self.task} {self.format}: {hint})"


def load_suite(path: Optional[str] = None) -> dict[str, dict]:
    """The benchmarks of a suite file (default: the shipped TULIP paper suite), checked."""
    path = Path(path) if path else DEFAULT_SUITE
    if not path.is_file():
        raise ConfigError(f"suite file {path} does not exist (shipped suites: "
                          f"{', '.join(sorted(p.name for p in SUITES.glob('*.yaml')))})")
    data = yaml.safe_load(path.read_text()) or {}
    sets = data.get("benchmarks")
    if not isinstance(sets, dict) or not sets:
        raise ConfigError(f"{path}: expected a 'benchmarks' mapping of name -> {{task, format, path}}")
    for name, spec in sets.items():
        where = f"{path}: benchmark {name!r}"
        if not isinstance(spec, dict) or spec.get("task") not in FORMATS or not spec.get("path"):
            raise ConfigError(f"{where}: needs task (one of {', '.join(FORMATS)}) and path, got {spec!r}")
        fmt = spec.get("format", DEFAULT_FORMAT[spec["task"]])
        if fmt not in FORMATS[spec["task"]]:
            raise ConfigError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS[spec['task']])} "
                              f"for task {spec['task']}")
        unknown = set(spec) - {"task", "format", "path", "templates", "split"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    return sets


def select(sets: dict[str, dict], names: str, root: str) -> list[Benchmark]:
    """The benchmarks named in `names` (comma separated, or `all`), paths under `root`."""
    wanted = list(sets) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in sets]
    if unknown or not wanted:
        raise ConfigError(f"--benchmarks {names!r}: unknown {unknown}; the suite has {', '.join(sets)} (or 'all')")
    out = []
    for name in wanted:
        spec = sets[name]
        out.append(Benchmark(name, spec["task"], spec.get("format", DEFAULT_FORMAT[spec["task"]]),
                             str(Path(root) / spec["path"]), spec.get("templates"), str(spec.get("split", "test"))))
    return out


def markdown_table(results: dict[str, dict]) -> str:
    """One row per benchmark: its headline metrics (in %), or why it did not run."""
    columns = [header for cols in HEADLINE.values() for _, header in cols]
    lines = ["| benchmark | task | format | " + " | ".join(columns) + " | samples |",
             "|---|---|---|" + "---|" * len(columns) + "---|"]
    for name, r in results.items():
        if "missing" in r:
            lines.append(f"| {name} | {r['task']} | {r['format']} | " + " | ".join("" for _ in columns)
                         + f" | missing: {r['missing']} |")
            continue
        metrics = r["metrics"]
        row = []
        for task, cols in HEADLINE.items():
            for key, _ in cols:
                value = metrics.get(f"eval/{task}/{key}") if task == r["task"] else None
                row.append("" if value is None else f"{100 * value:.1f}")
        count = metrics.get(f"eval/{r['task']}/samples", metrics.get(f"eval/{r['task']}/pairs", 0))  # probe: val
        lines.append(f"| {name} | {r['task']} | {r['format']} | " + " | ".join(row) + f" | {int(count)} |")
    return "\n".join(lines) + "\n"


def write_suite_results(out: Path, results: dict[str, dict], **context) -> Path:
    """<out> (JSON: every metric) and <out>.md (the table); returns the table's path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**context, "benchmarks": results}, indent=1, sort_keys=True) + "\n")
    table = out.with_suffix(".md")
    table.write_text(markdown_table(results))
    return table
