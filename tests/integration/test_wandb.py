"""logging.wandb: offline runs hold the metrics.jsonl losses; a resumed run continues the same run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tulip_mega.config import ConfigError, load_config
from tulip_mega.parallel.spawn import run_distributed
from tulip_mega.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")


def train_worker(overrides: list[str]) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.training.loop import train

    return train(load_config(RECIPE, overrides))


def read_wandb(path: Path) -> tuple[list[dict], dict]:
    """(history rows, run config) of a .wandb file (wandb's LevelDB-log of `Record` protobufs),
    decoded here because wandb ships no Python reader: a 7-byte header, then 32 KiB blocks of
    chunks (crc32 4, length 2, type 1: full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, rows, config, pending = 7, 32768, [], {}, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            kind_name = record.WhichOneof("record_type")
            if kind_name == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            elif kind_name in ("run", "config"):
                update = record.run.config.update if kind_name == "run" else record.config.update
                for item in update:
                    value = json.loads(item.value_json)  # stored as {"value": ..., "desc": ...}
                    config[item.key] = value["value"] if isinstance(value, dict) and "value" in value else value
    return rows, config


def _overrides(shapes_data: dict, tmp_path: Path, steps: int, *extra: str) -> list[str]:
    return [f"data.train_shards={shapes_data['train']}", f"data.tokenizer={shapes_data['tokenizer']}",
            f"run.output_dir={tmp_path}", "run.name=wb", f"train.steps={steps}", "optim.warmup_steps=1",
            "run.log_interval=1", "logging.tensorboard=false", "eval.interval=0", "checkpoint.interval=3",
            "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "parallel.sequence_parallel=false",
            "logging.wandb.mode=offline", "logging.wandb.project=tulip-test", *extra]


@pytest.mark.multiprocess
def test_offline_wandb_history_equals_metrics_jsonl_and_resume_appends(shapes_data, tmp_path):
    pytest.importorskip("wandb")
    run_distributed(train_worker, 1, _overrides(shapes_data, tmp_path, 3))
    run_distributed(train_worker, 1, _overrides(shapes_data, tmp_path, 5, "checkpoint.resume=true"))
    run = tmp_path / "wb"
    run_id = (run / "wandb_run_id").read_text().strip()
    folders = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2, list((run / "wandb").iterdir())  # one per process lifetime, the same run id
    read = [read_wandb(next(f.glob("*.wandb"))) for f in folders]
    history = [rows for rows, _ in read]
    for _, config in read:  # the resolved recipe (sizes filled in from the size table) is the run config
        assert config["model"]["text"]["hidden_size"] == 64 and config["train"]["steps"] in (3, 5), config
    wandb_loss = {row["_step"]: row["loss"] for rows in history for row in rows}
    jsonl_loss = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}
    assert sorted(jsonl_loss) == [1, 2, 3, 4, 5]
    assert wandb_loss == jsonl_loss
    assert [row["_step"] for row in history[1]] == [4, 5]  # the resumed process continues at step 4


def test_wandb_mode_is_checked():
    with pytest.raises(ConfigError, match="logging.wandb.mode expects 'online' | 'offline' | 'disabled', got 'sometimes'"):
        load_config(None, ["logging.wandb.mode=sometimes"])


def test_missing_wandb_fails_at_start_with_a_message(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"wandb is not installed: pip install 'tulip-mega\[wandb\]'"):
        load_config(None, ["logging.wandb.mode=offline"])
