"""Checkpoint publishing rules that need no process group: `latest` and interrupted saves."""

from pathlib import Path

import pytest

from tulip_mega.training.checkpoint import CheckpointError, _diff, read_latest


def _fake_checkpoint(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
                                        '"common_backend": "torch", "common_backend_version": 1}')


def test_interrupted_save_leaves_previous_checkpoint_usable(tmp_path):
    _fake_checkpoint(tmp_path / "step_0000010")
    (tmp_path / "latest").write_text("step_0000010\n")
    # A save of step 20 died half-way: its .partial folder exists, `latest` was never replaced.
    (tmp_path / "step_0000020.partial").mkdir()
    (tmp_path / "step_0000020.partial" / "__0_0.distcp").write_bytes(b"half")
    assert read_latest(tmp_path) == tmp_path / "step_0000010"


def test_no_checkpoint_yet(tmp_path):
    assert read_latest(tmp_path) is None


def test_latest_pointing_at_incomplete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "step_0000010").mkdir()
    (tmp_path / "latest").write_text("step_0000010\n")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        read_latest(tmp_path)


def test_model_shape_diff_names_keys():
    saved = {"vision": {"num_layers": 2, "hidden_size": 64}, "text": {"num_layers": 2}}
    now = {"vision": {"num_layers": 4, "hidden_size": 64}, "text": {"num_layers": 2}}
    assert _diff(saved, now) == [("vision.num_layers", 2, 4)]


def test_resumed_run_drops_metrics_logged_after_its_checkpoint(tmp_path):
    import json

    from tulip_mega.training.metrics import MetricsLogger, read_metrics

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    # Checkpoint at step 5, crash after step 7 was logged: steps 6-7 will be redone.
    logger = MetricsLogger(tmp_path, total_steps=10, enabled=True, tensorboard=False, start_step=5)
    logger.log(6, {"loss": 0.5}, start_step=5)
    logger.close()
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
