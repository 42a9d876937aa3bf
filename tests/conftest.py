"""Test set-up: the tests folder is importable (harness), markers are declared."""

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# megatron-core warns at import that TE/apex are missing; expected on a CPU machine.
warnings.filterwarnings("ignore", message=".*not installed.*")


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: spawns several gloo ranks")
    config.addinivalue_line("markers", "slow: takes more than ~30 s; still run in CI")


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> dict:
    """Synthetic shapes shards (32 px) and a tokenizer trained on their captions."""
    from tulip_mega.datagen.synthetic import write_shapes_dataset
    from tulip_mega.data.tokenizer import train_tokenizer_from_shards

    out = tmp_path_factory.mktemp("shapes")
    info = write_shapes_dataset(str(out), num_train=1024, num_val=128, samples_per_shard=128, image_size=32)
    tok = train_tokenizer_from_shards(info["train_spec"], str(out / "tokenizer"), vocab_size=1024)
    return {"train": info["train_spec"], "tokenizer": tok}


@pytest.fixture(scope="session")
def quickstart_data(tmp_path_factory) -> dict:
    """What scripts/quickstart.sh trains on: `tulip-mega data synth` and `tulip-mega tokenizer
    train` with their defaults (8 x 1024 train samples at 64 px, 256 val, classes.json)."""
    from tulip_mega.datagen.synthetic import write_shapes_dataset
    from tulip_mega.data.tokenizer import train_tokenizer_from_shards
    from tulip_mega.cli import build_parser

    out = tmp_path_factory.mktemp("quickstart_shapes")
    info = write_shapes_dataset(str(out))
    vocab = build_parser().parse_args(["tokenizer", "train", "--data", "x", "--out", "y"]).vocab_size
    tok = train_tokenizer_from_shards(info["train_spec"], str(out / "tokenizer"), vocab_size=vocab)
    return {"train": info["train_spec"], "val": info["val_spec"], "tokenizer": tok, "dir": out}


@pytest.fixture()
def small_shards(tmp_path) -> str:
    """3 shards x 6 samples of 16 px shapes, with the generator's pos/neg jpg and json negatives
    (the GeCo stage tests' input)."""
    from tulip_mega.datagen.synthetic import write_shapes_dataset

    info = write_shapes_dataset(str(tmp_path / "in"), num_train=18, num_val=0, samples_per_shard=6, image_size=16)
    return info["train_spec"]


@pytest.fixture(scope="session")
def eval_checkpoint(shapes_data, tmp_path_factory) -> str:
    """recipes/tiny_cpu.yaml trained 150 steps at TP = PP = 1 on the shapes set: a model that
    knows its colours a little (the eval format, CLIP_benchmark and suite tests)."""
    from eval_sets import train_worker
    from tulip_mega.parallel.spawn import run_distributed

    run = tmp_path_factory.mktemp("eval_checkpoint")
    return run_distributed(train_worker, 1, str(run), shapes_data["train"], shapes_data["tokenizer"], 150)[0]
