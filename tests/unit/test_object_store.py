"""Object-store shards (s3:// and msc:// URLs, through multi-storage-client) against a moto S3
server on 127.0.0.1: spec expansion, the reader, damage, and the loaders must give exactly what
the same shards give as local files. Nothing here reaches beyond the loopback address.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest
import torch

pytest.importorskip("multistorageclient")
pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from tulip_mega.data import object_store  # noqa: E402
from tulip_mega.data.dp_split import count_samples, shard_sizes  # noqa: E402
from tulip_mega.data.shards import ShardReadError, expand_shards, iter_samples  # noqa: E402
from tulip_mega.data.simple_loader import SimpleLoader  # noqa: E402
from tulip_mega.data.tokenizer import Tokenizer, train_tokenizer_from_shards  # noqa: E402
from tulip_mega.datagen.synthetic import write_shapes_dataset  # noqa: E402

NUM_TRAIN, PER_SHARD = 70, 16  # 5 shards: 16, 16, 16, 16, 6 (uneven on purpose)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A moto S3 server, a bucket holding the shards under ``data/`` (plus a damaged copy of one
    under ``broken/``), the same files locally, and the environment that points MSC at it."""
    from moto.server import ThreadedMotoServer

    root = tmp_path_factory.mktemp("objstore")
    local = root / "shards"
    info = write_shapes_dataset(str(local), num_train=NUM_TRAIN, num_val=8, samples_per_shard=PER_SHARD,
                                image_size=32)
    tok = train_tokenizer_from_shards(info["train_spec"], str(root / "tok"), vocab_size=256)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    bucket = f"tulip-{uuid.uuid4().hex[:12]}"  # MSC caches a client per bucket profile: never reuse one
    config = root / "msc.json"
    config.write_text(json.dumps({"profiles": {"shards": {
        "storage_provider": {"type": "s3", "options": {"base_path": f"{bucket}/data", "endpoint_url": endpoint,
                                                       "region_name": "us-east-1"}},
        "credentials_provider": {"type": "S3Credentials", "options": {"access_key": "k", "secret_key": "s"}},
    }}}))
    env = pytest.MonkeyPatch()
    for k in [k for k in os.environ if k.startswith(("AWS_", "MSC_"))]:
        env.delenv(k)  # never the user's credentials, profile or real endpoint
    env.setenv("AWS_ACCESS_KEY_ID", "k")
    env.setenv("AWS_SECRET_ACCESS_KEY", "s")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    env.setenv("AWS_ENDPOINT_URL", endpoint)
    env.setenv("MSC_CONFIG", str(config))

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    shards = sorted(info["train_shards"])
    for path in shards:
        s3.upload_file(path, bucket, "data/" + os.path.basename(path))
    s3.put_object(Bucket=bucket, Key="data/notes.txt", Body=b"not a shard")
    s3.put_object(Bucket=bucket, Key="data/sub/other.tar", Body=b"")  # folders do not recurse
    broken = root / "broken" / os.path.basename(shards[1])
    broken.parent.mkdir()
    data = open(shards[1], "rb").read()
    broken.write_bytes(data[:len(data) * 3 // 5])
    s3.upload_file(str(broken), bucket, "broken/" + broken.name)
    names = [os.path.basename(p) for p in shards]
    yield {"bucket": bucket, "local": shards, "names": names, "urls": [f"s3://{bucket}/data/{n}" for n in names],
           "broken": str(broken), "tok": Tokenizer(tok, 16), "tok_path": tok, "s3": s3}
    env.undo()
    server.stop()


def _read(shard: str) -> tuple[list[dict], ShardReadError | None]:
    out = []
    try:
        for s in iter_samples(shard):
            out.append(s)
    except ShardReadError as e:
        return out, e
    return out, None


def _without_shard(samples: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__shard__"} for s in samples]


def test_url_specs_expand_like_local_ones(store) -> None:
    b, urls = store["bucket"], store["urls"]
    n = len(urls)
    assert n == 5
    assert expand_shards(f"s3://{b}/data/train-{{000000..{n - 1:06d}}}.tar") == urls
    assert expand_shards(f"s3://{b}/data/train-*.tar") == urls
    assert expand_shards(f"s3://{b}/data/train-00000[13].tar") == [urls[1], urls[3]]
    assert expand_shards(f"s3://{b}/data/") == urls  # *.tar directly in the folder only
    assert expand_shards(f"s3://{b}/data") == urls
    assert expand_shards(f"s3://{b}/*/train-000000.tar") == [urls[0]]
    assert expand_shards(f"{urls[2]}, {store['local'][0]}") == [urls[2], store["local"][0]]
    assert expand_shards("msc://shards/train-{000000..000001}.tar") == [
        "msc://shards/train-000000.tar", "msc://shards/train-000001.tar"]
    assert expand_shards("msc://shards/") == [f"msc://shards/{name}" for name in store["names"]]


def test_missing_objects_fail_naming_spec_and_url(store) -> None:
    b = store["bucket"]
    spec = f"s3://{b}/data/train-{{000003..000006}}.tar"
    with pytest.raises(FileNotFoundError, match=r"2 of 4 shards .* do not exist: s3://.*/train-000005\.tar, "
                                                r"s3://.*/train-000006\.tar") as e:
        expand_shards(spec)
    assert spec in str(e.value)
    # one folder listing instead of a request per URL for a long range: same answer
    many = [f"s3://{b}/data/train-{i:06d}.tar" for i in range(40)]
    assert object_store.missing_objects(many) == many[5:]
    with pytest.raises(FileNotFoundError, match=r"shard object 's3://.*/data/train-000009\.tar' does not exist"):
        expand_shards(f"s3://{b}/data/train-000009.tar")
    with pytest.raises(FileNotFoundError, match=r"glob 's3://.*/data/val-\*\.tar' matched no objects"):
        expand_shards(f"s3://{b}/data/val-*.tar")
    with pytest.raises(FileNotFoundError, match=r"folder 's3://.*/nothing/' contains no \*\.tar objects"):
        expand_shards(f"s3://{b}/nothing/")


def test_reader_gives_the_local_samples_and_the_same_damage(store) -> None:
    for url, path in zip(store["urls"], store["local"]):
        remote, err = _read(url)
        local, _ = _read(path)
        assert err is None and len(remote) == len(local) > 0
        assert all(s["__shard__"] == url for s in remote)
        assert _without_shard(remote) == _without_shard(local)
    # offsets are for os.pread on local files: URL samples keep their bytes instead
    first = next(iter_samples(store["urls"][0], offsets=True))
    assert "__offsets__" not in first and first["jpg"][:2] == b"\xff\xd8"
    assert "__offsets__" in next(iter_samples(store["local"][0], offsets=True))

    url = f"s3://{store['bucket']}/broken/{os.path.basename(store['broken'])}"
    remote, rerr = _read(url)
    local, lerr = _read(store["broken"])
    assert rerr is not None and lerr is not None and 0 < len(remote) < PER_SHARD
    assert _without_shard(remote) == _without_shard(local)
    assert (rerr.shard, rerr.num_good, rerr.last_key, rerr.reason) == (url, lerr.num_good, lerr.last_key, lerr.reason)
    assert str(rerr) == str(lerr).replace(store["broken"], url)

    gone = f"s3://{store['bucket']}/data/deleted-after-listing.tar"
    samples, err = _read(gone)
    assert samples == [] and err is not None and err.shard == gone and "cannot open: FileNotFoundError" in str(err)


def test_counts_use_no_index_and_cache_by_object_stamp(store, tmp_path) -> None:
    urls = store["urls"]
    assert shard_sizes(urls, index_dir=str(tmp_path)) == [16, 16, 16, 16, 6]
    assert count_samples(f"s3://{store['bucket']}/broken/{os.path.basename(store['broken'])}") == len(
        _read(store["broken"])[0])
    # a new version of the object (another size) is counted again, not taken from the cache
    key = f"cache/{store['names'][4]}"
    s3, b = store["s3"], store["bucket"]
    s3.upload_file(store["local"][4], b, key)
    assert count_samples(f"s3://{b}/{key}") == 6
    s3.upload_file(store["local"][0], b, key)
    assert count_samples(f"s3://{b}/{key}") == 16


def _batches(loader) -> list:
    return [(list(batch.keys), batch.tensor_fields()) for batch in loader]


def _assert_same(a: list, b: list) -> None:
    assert [k for k, _ in a] == [k for k, _ in b] and a
    for (_, x), (_, y) in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("dp_size", [1, 2])
def test_simple_loader_over_the_bucket_equals_local(store, dp_size) -> None:
    for rank in range(dp_size):
        kw = dict(batch_size=8, image_size=32, tokenizer=store["tok"], seed=3, shuffle_buffer=16, num_epochs=1,
                  dp_rank=rank, dp_size=dp_size)
        _assert_same(_batches(SimpleLoader(store["urls"], **kw)), _batches(SimpleLoader(store["local"], **kw)))


@pytest.mark.parametrize("dp_size,workers", [(1, 0), (2, 2)])
def test_dali_loader_over_the_bucket_equals_local(store, dp_size, workers) -> None:
    pytest.importorskip("nvidia.dali")
    from tulip_mega.data.dali_loader import DaliLoader
    from tulip_mega.data.dali_pipeline import ViewPlan

    plan = ViewPlan(image_size=32, crops=1, local_crops=1, local_size=16)
    for rank in range(dp_size):
        kw = dict(batch_size=8, plan=plan, tokenizer=store["tok"], gpu=False, threads=1, seed=4, shuffle_buffer=16,
                  num_epochs=1, dp_rank=rank, dp_size=dp_size, reader_workers=workers)
        _assert_same(_batches(DaliLoader(store["urls"], **kw)), _batches(DaliLoader(store["local"], **kw)))


def test_reader_workers_see_store_settings_made_after_the_fork_server_started(store, tmp_path, monkeypatch) -> None:
    """Workers are forked from a fork server holding the environment of when it started; the
    pool hands them the loader's object-store settings of now (here: an MSC config naming a
    profile the server's environment does not know)."""
    pytest.importorskip("nvidia.dali")
    from tulip_mega.data import reader_pool
    from tulip_mega.data.dali_loader import DaliLoader
    from tulip_mega.data.dali_pipeline import ViewPlan

    ctx = reader_pool._context()
    with reader_pool._parent_signals_blocked():
        reader_pool._start_helpers(ctx)  # the server exists before the new setting (as in a long-lived process)
    config = json.loads(open(os.environ["MSC_CONFIG"]).read())
    config["profiles"]["moved"] = config["profiles"].pop("shards")
    (tmp_path / "moved.json").write_text(json.dumps(config))
    monkeypatch.setenv("MSC_CONFIG", str(tmp_path / "moved.json"))
    monkeypatch.setenv("AWS_PROFILE", "stale")  # set, then unset: must be gone in the workers too
    monkeypatch.delenv("AWS_PROFILE")
    name = store["names"][4]
    kw = dict(batch_size=6, plan=ViewPlan(image_size=32), tokenizer=store["tok"], gpu=False, threads=1,
              shuffle_buffer=0, num_epochs=1)
    remote = DaliLoader([f"msc://moved/{name}"], reader_workers=1, **kw)  # the pool lives while it iterates
    _assert_same(_batches(remote), _batches(DaliLoader([store["local"][4]], **kw)))


def test_index_files_refuse_urls(store) -> None:
    from tulip_mega.data.dali_index import build_index

    with pytest.raises(ValueError, match="index files are for local shards only"):
        build_index(store["urls"][0])


def test_local_copy_is_untouched(store, tmp_path) -> None:
    """Local specs keep their exact behaviour next to URL support (paths, not URLs, come back)."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in store["local"]:
        shutil.copy(p, folder)
    assert expand_shards(str(folder)) == [str(folder / n) for n in store["names"]]
    assert not object_store.is_url(str(folder)) and object_store.is_url("s3://b/k")


def _train_worker(overrides: list[str]) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.config import load_config
    from tulip_mega.training.loop import train

    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny_cpu.yaml")
    return train(load_config(recipe, overrides))


def test_trainer_reads_its_shards_from_the_bucket(store, tmp_path) -> None:
    """The trainer's path (config -> expand_shards -> loader) with data.train_shards=s3://...,
    two DP ranks (so the shards are counted through the store) on spawned gloo processes."""
    from tulip_mega.parallel.spawn import run_distributed
    from tulip_mega.training.metrics import read_metrics

    overrides = [
        f"data.train_shards=s3://{store['bucket']}/data/train-{{000000..000004}}.tar",
        f"data.tokenizer={store['tok_path']}",
        f"run.output_dir={tmp_path}", "run.name=s3", "train.steps=2", "optim.warmup_steps=1",
        "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "train.global_batch_size=16",
        "train.micro_batch_size=8", "logging.tensorboard=false", "eval.interval=0", "checkpoint.interval=0",
    ]
    run_distributed(_train_worker, 2, overrides, timeout=120)
    metrics = read_metrics(tmp_path / "s3" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)
