"""megatron-energon dataset folders: `tulip-mega data prepare`, split.yaml shards, our counts, blends.

A tiny shapes set (32 px, shards of 16 with a short last one) is prepared through the CLI; energon
itself must then load it, expand_shards must give its train split, dp_split must take the counts
prepare recorded without reading a shard, and damaged shards must be reported and counted as our
reader counts them (energon's preparation cannot take a shard cut inside a file at all).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile

import pytest
import yaml

from tulip_mega.cli import main
from tulip_mega.data import dp_split
from tulip_mega.data.energon_meta import energon_shards, is_energon_dataset, read_metadataset
from tulip_mega.data.shards import expand_shards, iter_samples
from tulip_mega.datagen.synthetic import write_shapes_dataset


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _our_count(shard: str) -> int:
    """What our reader counts (dp_split.count_samples: the good samples before any damage)."""
    return dp_split.count_samples(shard)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """50 train samples in shards of 16 (16, 16, 16, 2) + 8 val, prepared with split parts."""
    root = str(tmp_path_factory.mktemp("energon") / "shapes")
    write_shapes_dataset(root, num_train=50, num_val=8, samples_per_shard=16, image_size=32)
    for idx in [n for n in os.listdir(root) if n.endswith(".idx")]:
        os.remove(os.path.join(root, idx))  # so shard_sizes has only tulip_counts.json or reading
    rc, out, err = _cli(["data", "prepare", root, "--split-parts", "train:train-.*", "val:val-.*",
                         "--num-workers", "1"])
    return root, rc, out, err


def test_prepare_writes_energon_meta_and_prints_our_summary(prepared):
    root, rc, out, _ = prepared
    assert rc == 0, out
    meta = os.path.join(root, ".nv-meta")
    for name in ("index.sqlite", "split.yaml", "dataset.yaml", ".info.json", "tulip_counts.json"):
        assert os.path.isfile(os.path.join(meta, name)), name
    with open(os.path.join(meta, "dataset.yaml")) as f:
        assert yaml.safe_load(f) == {"__module__": "megatron.energon", "__class__": "CrudeWebdataset"}
    with open(os.path.join(meta, ".info.json")) as f:
        assert json.load(f)["shard_counts"] == {"train-000000.tar": 16, "train-000001.tar": 16,
                                                "train-000002.tar": 16, "train-000003.tar": 2, "val-000000.tar": 8}
    lines = out.splitlines()
    assert lines[0].endswith("train 4 shards, val 1 shards"), lines[0]
    assert "read with tulip-mega's reader: 5 shards, 58 samples" in lines
    assert "parts: jpg 58, json 58, neg.jpg 58, pos.jpg 58, txt 58" in lines
    assert "samples without an image (jpg): 0; without a caption (txt): 0" in lines
    assert "damaged shards: 0" in lines
    with open(os.path.join(meta, "tulip_counts.json")) as f:
        counts = json.load(f)["shards"]
    assert {k: v["samples"] for k, v in counts.items()} == {
        "train-000000.tar": 16, "train-000001.tar": 16, "train-000002.tar": 16, "train-000003.tar": 2,
        "val-000000.tar": 8}


@pytest.mark.filterwarnings("ignore:.*pin_memory")  # energon's DataLoader on a CPU machine
def test_energon_loads_the_prepared_folder(prepared):
    from megatron.energon import Cooker, DefaultTaskEncoder, WorkerConfig, get_savable_loader, get_train_dataset
    from megatron.energon import stateless

    @stateless
    def cook(sample):
        return sample

    class Raw(DefaultTaskEncoder):
        decoder = None
        cookers = [Cooker(cook)]

        def encode_sample(self, sample):
            return sample

        def batch(self, samples):
            return samples

    root = prepared[0]
    ds = get_train_dataset(root, worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0), batch_size=None,
                           shuffle_buffer_size=None, max_samples_per_sequence=None, task_encoder=Raw(), repeat=False)
    ours = {s["__key__"]: s for sh in expand_shards(root) for s in iter_samples(sh)}
    seen = 0
    for sample in get_savable_loader(ds, gc_collect_every_n_steps=0, watchdog_timeout_seconds=None):
        assert sample["txt"] == ours[sample["__key__"]]["txt"]  # the same bytes as our reader's
        assert sample["jpg"] == ours[sample["__key__"]]["jpg"]
        seen += 1
        if seen == 5:
            break
    assert seen == 5


def test_expand_shards_of_a_prepared_folder_is_its_train_split(prepared, tmp_path):
    root = prepared[0]
    train = [os.path.join(root, f"train-{i:06d}.tar") for i in range(4)]
    assert is_energon_dataset(root)
    assert expand_shards(root) == train == energon_shards(root)
    assert energon_shards(root, "val") == [os.path.join(root, "val-000000.tar")]
    with pytest.raises(ValueError, match=r"split\.yaml: key 'split_parts\.test' is missing"):
        energon_shards(root, "test")
    # A plain folder still globs *.tar (the val shard included).
    plain = tmp_path / "plain"
    shutil.copytree(root, plain, ignore=shutil.ignore_patterns(".nv-meta"))
    assert len(expand_shards(str(plain))) == 5


def test_shard_sizes_uses_recorded_counts_without_reading(prepared, monkeypatch):
    root = prepared[0]
    shards = expand_shards(root)

    def no_reading(shard):
        raise AssertionError(f"read {shard}")

    monkeypatch.setattr(dp_split, "count_samples", no_reading)
    assert dp_split.shard_sizes(shards) == [16, 16, 16, 2]
    # A shard whose mtime changed since prepare is counted again, by reading.
    st = os.stat(shards[3])
    os.utime(shards[3], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        with pytest.raises(AssertionError, match="train-000003.tar"):
            dp_split.shard_sizes(shards)
    finally:
        os.utime(shards[3], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert dp_split.shard_sizes(shards) == [16, 16, 16, 2]


def _cut(shard: str, member_name: str, mid_data: bool) -> None:
    """Truncate ``shard`` at ``member_name``'s header, or halfway through its data."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(member_name)
    at = member.offset_data + member.size // 2 if mid_data else member.offset
    with open(shard, "r+b") as f:
        f.truncate(at)


def test_prepare_reports_damaged_shards_counted_as_our_reader_counts(tmp_path, monkeypatch):
    root = str(tmp_path / "cut")
    info = write_shapes_dataset(root, num_train=40, num_val=0, samples_per_shard=16, image_size=32)
    a, b = info["train_shards"][1], info["train_shards"][2]
    _cut(a, "train0000021.jpg", mid_data=False)  # at a header: samples 16-20 read, the fifth partial
    _cut(b, "train0000035.txt", mid_data=True)  # inside a file: samples 32-34 and a partial 35 (jpg only)
    assert _cli(["data", "index", "--data", root])[0] == 1  # DALI indexes beside the shards (damage: exit 1)
    rc, out, _ = _cli(["data", "prepare", root, "--num-workers", "1"])
    assert rc == 1  # damage found (like `data index` / `data stats`)
    assert "read with tulip-mega's reader: 3 shards, 25 samples" in out  # 16 + 5 + 4
    assert "parts: jpg 25, json 24, neg.jpg 24, pos.jpg 24, txt 24" in out
    assert "samples without an image (jpg): 0; without a caption (txt): 1" in out
    assert "damaged shards: 2" in out
    assert "train-000001.tar: 5 samples before the damage; shard " in out
    assert "no end-of-archive marker" in out
    assert "train-000002.tar: 4 samples before the damage; shard " in out
    assert "unexpected end of data" in out
    assert "left out of energon's index: train-000002.tar: tarfile cannot list it to the end" in out
    meta = os.path.join(root, ".nv-meta")
    with open(os.path.join(meta, ".info.json")) as f:
        energon_counts = json.load(f)["shard_counts"]
    with open(os.path.join(meta, "tulip_counts.json")) as f:
        ours = json.load(f)["shards"]
    # Cut at a header, energon counts what our reader counts; cut inside a file it cannot index the shard.
    assert energon_counts == {"train-000000.tar": 16, "train-000001.tar": 5}
    assert {k: v["samples"] for k, v in ours.items()} == {
        "train-000000.tar": 16, "train-000001.tar": 5, "train-000002.tar": 4}
    assert [_our_count(s) for s in info["train_shards"]] == [16, 5, 4]
    assert "no end-of-archive marker" in ours["train-000001.tar"]["damage"]
    assert ours["train-000000.tar"]["damage"] is None
    assert expand_shards(root) == info["train_shards"][:2]
    # energon's binary tar index replaced the DALI .idx files of the two shards it indexed (same name):
    # said, and shard_sizes takes the recorded counts for those; the left-out shard keeps its DALI
    # index, which counts intact samples only (3).
    assert "energon replaced 2 DALI index files" in out
    monkeypatch.setattr(dp_split, "count_samples", lambda shard: pytest.fail(f"read {shard}"))
    assert dp_split.shard_sizes(info["train_shards"]) == [16, 5, 3]


def test_data_index_refuses_to_overwrite_energons_tar_index(prepared, tmp_path):
    root = prepared[0]
    shard = os.path.join(root, "train-000000.tar")
    with open(shard + ".idx", "rb") as f:
        energon_index = f.read()
    rc, out, err = _cli(["data", "index", "--data", root])
    assert rc == 2 and out == ""
    assert f"{shard}.idx exists and is not a DALI index: energon's binary tar index" in err
    with open(shard + ".idx", "rb") as f:
        assert f.read() == energon_index
    rc, out, _ = _cli(["data", "index", "--data", root, "--index-dir", str(tmp_path)])
    assert rc == 0 and "train-000000.tar.idx: 16 samples" in out


def test_prepare_refuses_a_folder_without_tars(tmp_path):
    (tmp_path / "notes.txt").write_text("no shards here")
    rc, out, err = _cli(["data", "prepare", str(tmp_path)])
    assert rc == 2 and out == ""
    assert f"data prepare error: data prepare: {tmp_path} holds no .tar or .tgz shards" in err
    assert not (tmp_path / ".nv-meta").exists()


def _fake_energon(path) -> str:
    os.makedirs(os.path.join(path, ".nv-meta"))
    with open(os.path.join(path, ".nv-meta", "split.yaml"), "w") as f:
        yaml.safe_dump({"split_parts": {"train": ["a.tar"]}, "exclude": []}, f)
    return str(path)


def _write(path, doc) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return str(path)


def test_read_metadataset_blend_and_single_path(tmp_path):
    a = _fake_energon(tmp_path / "one" / "coco")
    b = _fake_energon(tmp_path / "two" / "coco")
    mds = _write(tmp_path / "blend.yaml", {
        "__module__": "megatron.energon", "__class__": "MetadatasetV2",
        "splits": {"train": {"blend": [{"weight": 2, "path": "./one/coco"}, {"weight": 0.5, "path": "two/coco"}]},
                   "val": {"path": "one/coco"}}})
    got = read_metadataset(mds)
    assert [(e.name, e.path, e.weight) for e in got] == [("coco", a, 2.0), ("coco-2", b, 0.5)]
    assert [(e.name, e.path, e.weight) for e in read_metadataset(mds, "val")] == [("coco", a, 1.0)]


def test_energon_parses_the_same_blend(prepared, tmp_path):
    """Our reading of the format is energon's: its own loader takes the YAML we test with."""
    from megatron.energon.epathlib import EPath
    from megatron.energon.metadataset.loader import load_dataset

    other = tmp_path / "copy" / "shapes"
    shutil.copytree(prepared[0], other)
    mds = _write(tmp_path / "blend.yaml", {
        "__module__": "megatron.energon", "__class__": "MetadatasetV2",
        "splits": {"train": {"blend": [{"weight": 2, "path": prepared[0]}, {"weight": 1, "path": "copy/shapes"}]}}})
    loaded = load_dataset(EPath(mds))
    assert type(loaded).__name__ == "MetadatasetV2"
    assert [float(r.weight) for r in loaded.splits["train"].blend] == [2.0, 1.0]
    assert [(e.path, e.weight) for e in read_metadataset(mds)] == [(prepared[0], 2.0), (str(other), 1.0)]


@pytest.mark.parametrize("split, key", [
    ({"blend": [{"path": "ds", "weight": 1, "subflavors": {"a": 1}}]}, "splits.train.blend[0].subflavors"),
    ({"blend": [{"path": "ds", "subset": {"range": [0, 10]}}]}, "splits.train.blend[0].subset"),
    ({"blend": [{"path": "ds"}], "subset": {"range": ["0%", "50%"]}}, "splits.train.subset"),
    ({"join": [{"path": "ds"}, {"path": "ds"}], "joiner": {"__module__": "x", "__class__": "Y"}}, "splits.train.join"),
    ({"blend_epochized": [{"path": "ds", "repetitions": 2}]}, "splits.train.blend_epochized"),
    ({"blend": [{"path": "inner.yaml", "weight": 1}]}, "splits.train.blend[0].path"),
])
def test_read_metadataset_rejects_unsupported_keys(tmp_path, split, key):
    _fake_energon(tmp_path / "ds")
    _write(tmp_path / "inner.yaml", {"__module__": "megatron.energon", "__class__": "MetadatasetV2", "splits": {}})
    mds = _write(tmp_path / "mds.yaml", {"__module__": "megatron.energon", "__class__": "MetadatasetV2",
                                        "splits": {"train": split}})
    with pytest.raises(ValueError) as err:
        read_metadataset(mds)
    msg = str(err.value)
    assert msg.startswith(f"{mds}: key '{key}'"), msg
    assert "unsupported" in msg


def test_read_metadataset_names_the_file_for_other_mistakes(tmp_path):
    _fake_energon(tmp_path / "ds")
    v1 = _write(tmp_path / "v1.yaml", {"__module__": "megatron.energon", "__class__": "Metadataset", "splits": {}})
    with pytest.raises(ValueError, match=r"v1\.yaml: keys '__module__'/'__class__' must be"):
        read_metadataset(v1)
    nosplit = _write(tmp_path / "nosplit.yaml", {"__module__": "megatron.energon", "__class__": "MetadatasetV2",
                                                 "splits": {"val": {"path": "ds"}}})
    with pytest.raises(ValueError, match=r"nosplit\.yaml: key 'splits\.train' is missing"):
        read_metadataset(nosplit)
    missing = _write(tmp_path / "missing.yaml", {"__module__": "megatron.energon", "__class__": "MetadatasetV2",
                                                 "splits": {"train": {"blend": [{"path": "nope", "weight": 1}]}}})
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml: key 'splits\.train\.blend\[0\]\.path'.*not a prepared"):
        read_metadataset(missing)
    bad_weight = _write(tmp_path / "w.yaml", {"__module__": "megatron.energon", "__class__": "MetadatasetV2",
                                              "splits": {"train": {"blend": [{"path": "ds", "weight": -1}]}}})
    with pytest.raises(ValueError, match=r"w\.yaml: key 'splits\.train\.blend\[0\]\.weight': expected a positive"):
        read_metadataset(bad_weight)


def test_energon_read_benchmark_runs_and_checks_its_sample_counts(capsys):
    """benchmarks/energon_read.py at a tiny size: every row measured (its passes check that each
    handled exactly the epoch's samples), and a pass that loses samples stops the run."""
    pytest.importorskip("nvidia.dali")
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location("energon_read_bench", bench_dir / "energon_read.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        bench.main(["--samples", "128", "--samples-per-shard", "64", "--rounds", "1"])
    finally:
        sys.path.remove(str(bench_dir))
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:6]]
    assert [r[0] for r in rows] == ["raw", "siglip:", "clip_rocket:", "tulip:"]
    numbers = [[float(x.rstrip("x")) for x in r if x[0].isdigit()] for r in rows]
    assert [len(n) for n in numbers] == [3, 5, 5, 5]  # energon, ours, ratio (+ host path, ratio)
    assert all(x > 0 for n in numbers for x in n)
    with pytest.raises(SystemExit, match="a pass handled 3 samples, expected 4"):
        bench.us_per_sample(lambda: 3, 4)
