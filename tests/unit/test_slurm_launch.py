"""slurm/common.sh's launch settings, without a SLURM cluster and without pyxis.

- tulip_mega/slurm_launch.py: the container mounts a resolved recipe needs (shard specs of
  every form, tokenizer, checkpoint and init folders; folders inside the repository or inside
  each other dropped; a missing input left out with a note; a missing output folder created)
  and OMP_NUM_THREADS per task;
- slurm/tulip_1b.sh run by bash with a stand-in `srun` / `scontrol` on PATH that record their
  arguments (and run the config check's command without the container flags): the CPU share
  and binding on a 224-CPU 8-task node, the config check run in the container as one task, the
  derived --container-mounts, OMP_NUM_THREADS as the tasks see it, and a stop signal that
  arrives before the launch requeueing the job without starting the tasks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tulip_mega.slurm_launch import container_mounts, folders_for, mount_folders, omp_threads

REPO = Path(__file__).resolve().parents[2]


def test_folders_for_each_kind_of_path(tmp_path):
    shard_dir = tmp_path / "data" / "x"
    shard_dir.mkdir(parents=True)
    base = str(tmp_path / "repo")
    assert folders_for("shards", f"{shard_dir}/train-{{000000..000099}}.tar", base) == [str(shard_dir)]
    assert folders_for("shards", f"{tmp_path}/data/{{a,b}}/*.tar,{shard_dir}/one.tar", base) == [
        str(tmp_path / "data"), str(shard_dir)]
    assert folders_for("shards", f"{shard_dir}/s-*.tar", base) == [str(shard_dir)]
    assert folders_for("shards", str(shard_dir), base) == [str(shard_dir)]  # a folder of shards
    assert folders_for("shards", "data/shapes/train-{0..7}.tar", base) == [f"{base}/data/shapes"]
    assert folders_for("file", "~/tok/t.model", base) == [os.path.expanduser("~/tok")]
    assert folders_for("dir", f"{tmp_path}/ckpt/step_0000100/", base) == [f"{tmp_path}/ckpt/step_0000100"]


def test_mount_folders_dedupes_skips_the_repo_and_notes_missing_inputs(tmp_path):
    repo, data, tok, init = (tmp_path / n for n in ("repo", "data", "tok", "hf"))
    for d in (repo / "data", data / "train", data / "eval", tok, init):
        d.mkdir(parents=True)
    config = {
        "data": {"train_shards": f"{data}/train/{{000..009}}.tar,{data}/eval/x.tar", "tokenizer": f"{tok}/t.model"},
        "eval": {"zeroshot_shards": "data/zs-{0..3}.tar", "classes": f"{tmp_path}/missing/classes.json",
                 "retrieval_shards": f"{data}/*.tar", "linear_probe_shards": None},
        "checkpoint": {"dir": f"{tmp_path}/out/ckpt", "load": None},
        "model": {"init_from_hf": str(init), "init_from_open_clip": None},
        "run": {"output_dir": "runs"},
    }
    notes: list[str] = []
    folders = mount_folders(config, str(repo), [str(repo)], notes)
    # data/train and data/eval are inside data (the retrieval glob's folder): one mount.
    assert folders == [str(repo), str(tok), str(data), str(init), f"{tmp_path}/out/ckpt"]
    assert (tmp_path / "out" / "ckpt").is_dir(), "an output folder is created so pyxis can mount it"
    assert notes == [f"eval.classes: folder {tmp_path}/missing does not exist on this node; not mounted "
                     "(it must then exist inside the image)"]
    assert container_mounts(folders[:2]) == f"{repo}:{repo},{tok}:{tok}"
    with pytest.raises(ValueError, match="separates entries with ','"):
        container_mounts(["/data/a,b"])


def test_mount_folders_of_mixtures_blends_and_object_store_urls(tmp_path):
    repo, web, cur, laion = (tmp_path / n for n in ("repo", "web", "cur", "laion"))
    for d in (repo, web, cur, laion / ".nv-meta"):
        d.mkdir(parents=True)
    # data.mixture: each dataset's shard folder; an s3:// dataset needs none (and is not "missing").
    config = {"data": {"train_shards": "s3://bucket/x/{000..009}.tar", "mixture": [
        {"shards": f"{web}/{{000..009}}.tar", "weight": 3.0, "name": "web"},
        {"shards": "s3://bucket/cur/", "weight": 1.0, "name": "s3"}, {"shards": str(cur), "weight": 1.0, "name": ""}]}}
    notes: list[str] = []
    assert mount_folders(config, str(repo), [str(repo)], notes) == [str(repo), str(web), str(cur)]
    assert notes == []
    # An energon blend YAML in data.train_shards: its folder and each dataset folder it names.
    (cur / ".nv-meta").mkdir()
    for folder in (laion, cur):
        (folder / ".nv-meta" / "split.yaml").write_text("split_parts:\n  train: [a.tar]\n")
    blend = tmp_path / "blends" / "mix.yaml"
    blend.parent.mkdir()
    blend.write_text("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n    blend:\n"
                     f"      - {{weight: 2, path: {laion}}}\n      - {{weight: 1, path: ../cur}}\n")
    assert folders_for("shards", str(blend), str(repo)) == [str(blend.parent), str(laion), str(cur)]


@pytest.mark.parametrize("data, cpus, want", [
    ({"threads": 2, "reader_workers": 0, "prefetch": 2}, 28, 24),
    ({"threads": 4, "reader_workers": 6, "prefetch": 0}, 28, 17),
    ({"threads": 2, "reader_workers": 4, "prefetch": 2}, 1, 1),
])
def test_omp_threads_are_the_cores_the_loader_leaves(data, cpus, want):
    assert omp_threads({"data": data}, cpus) == want


# ---------------------------------------------------------------------------- common.sh

_FAKE_SRUN = """#!/bin/bash
# Stand-in srun: record the arguments and what the task environment says, then run the config
# check's command without srun's and pyxis's flags; the training step just exits $FAKE_TRAIN_RC.
{ printf '%s\\n' "ARGS $*"; echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"; } >> "$FAKE_LOG"
cmd=(); for a in "$@"; do if (( ${#cmd[@]} )) || [[ $a != -* ]]; then cmd+=("$a"); fi; done
if [[ " $* " == *" tulip_mega.cli config "* ]]; then
    [[ -n "${FAKE_SIGNAL_DURING_CONFIG:-}" ]] && kill -s "$FAKE_SIGNAL_DURING_CONFIG" "$PPID"
    exec "${cmd[@]}"
fi
exit "${FAKE_TRAIN_RC:-0}"
"""
# Stand-in scontrol: record, and on requeue end the batch shell as SLURM does.
_FAKE_SCONTROL = """#!/bin/bash
echo "SCONTROL $*" >> "$FAKE_LOG"
[[ $1 == requeue ]] && kill -9 "$PPID"
exit 0
"""


def _run_batch_script(tmp_path: Path, overrides: list[str], **env: str) -> tuple[subprocess.CompletedProcess, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", _FAKE_SRUN), ("scontrol", _FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "fake.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_", "SRUN_"))}
    base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), PYTHON=sys.executable,
                HOST_PYTHON=sys.executable, PYTHONPATH=str(REPO), REPO_DIR=str(REPO),
                RUN_ROOT=str(tmp_path / "runs"), RUN_NAME="fake", SLURM_JOB_ID="4242", SLURM_JOB_NAME="tulip-1b",
                SLURM_CPUS_ON_NODE="224", SLURM_NTASKS_PER_NODE="8", SLURM_TASKS_PER_NODE="8(x64)", **env)
    proc = subprocess.run(["bash", str(REPO / "slurm" / "tulip_1b.sh"), *overrides], cwd=REPO, env=base,
                          capture_output=True, text=True, timeout=120)
    return proc, log.read_text() if log.exists() else ""


def _data_overrides(shapes_data: dict) -> list[str]:
    return [f"data.train_shards={shapes_data['train']}", f"data.tokenizer={shapes_data['tokenizer']}"]


def test_batch_script_cpus_binding_container_mounts_and_config_check_in_the_image(shapes_data, tmp_path):
    ckpt = tmp_path / "ckpts"
    proc, log = _run_batch_script(tmp_path, [*_data_overrides(shapes_data), "data.threads=3", "data.reader_workers=4",
                                             f"checkpoint.dir={ckpt}"], CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.01-py3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config_call, train_call = [line for line in log.splitlines() if line.startswith("ARGS")]
    # The config check: in the image, one task, repository and run root mounted.
    runs = tmp_path / "runs"
    assert config_call.startswith(f"ARGS --ntasks=1 --nodes=1 --cpus-per-task=1 "
                                  f"--container-image=nvcr.io#nvidia/pytorch:25.01-py3 --container-workdir={REPO} "
                                  f"--container-mounts={REPO}:{REPO},{runs}:{runs} ")
    config = json.loads((runs / "fake" / "launch" / "job4242-restart0.config.json").read_text())
    assert config["data"]["reader_workers"] == 4
    # The training step: 224 CPUs / 8 tasks, bound socket by socket; mounts from the resolved recipe.
    shard_dir = os.path.dirname(shapes_data["train"])
    tok_dir = os.path.dirname(shapes_data["tokenizer"])
    mounts = ",".join(f"{d}:{d}" for d in dict.fromkeys([str(REPO), str(runs), shard_dir, tok_dir, str(ckpt)]))
    assert (" --cpus-per-task=28 --cpu-bind=cores --distribution=block:block "
            f"--container-image=nvcr.io#nvidia/pytorch:25.01-py3 --container-workdir={REPO} "
            f"--container-mounts={mounts} ") in train_call, train_call
    assert "tulip_mega.train recipes/tulip_1b.yaml" in train_call and train_call.endswith("--resume")
    # 28 cores - training thread - 3 DALI threads - 4 reader workers - prefetch thread = 19.
    assert log.splitlines()[-1] == "OMP_NUM_THREADS=19"
    record = (runs / "fake" / "launch" / "job4242-restart0.txt").read_text()
    assert "cpus:      28 per task (node 224 CPUs, 8 tasks), OMP_NUM_THREADS=19" in record
    assert "training finished" in proc.stdout


def test_batch_script_user_cpus_per_task_and_omp_win(shapes_data, tmp_path):
    proc, log = _run_batch_script(tmp_path, _data_overrides(shapes_data), SLURM_CPUS_PER_TASK="12",
                                  OMP_NUM_THREADS="3", SRUN_CPU_BIND="none")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (train_call,) = [line for line in log.splitlines() if line.startswith("ARGS")]  # config: no srun, no container
    assert " --cpus-per-task=12 --distribution=block:block " in train_call and "--cpu-bind" not in train_call
    assert "--container" not in train_call
    assert log.splitlines()[-1] == "OMP_NUM_THREADS=3"


def test_signal_before_the_launch_requeues_without_starting_the_tasks(shapes_data, tmp_path):
    proc, log = _run_batch_script(tmp_path, _data_overrides(shapes_data), CONTAINER_IMAGE="img",
                                  FAKE_SIGNAL_DURING_CONFIG="USR1")
    calls = [line for line in log.splitlines() if line.startswith(("ARGS", "SCONTROL"))]
    assert len(calls) == 2 and "tulip_mega.cli config" in calls[0], log  # no training step
    assert calls[1] == "SCONTROL requeue 4242"
    assert "received SIGUSR1 before the tasks started" in proc.stdout
    assert "nothing to checkpoint yet" in proc.stdout and "requeueing job 4242" in proc.stdout


# ---------------------------------------------------------------------------- trainer's CPU check

def test_plan_host_cores_is_the_figure_plan_prints(capsys):
    """The trainer's host-core need on tulip_1b at 64 x 8 GPUs = ceil(plan's printed cores per
    loading rank / HOST_CORE_SHARE)."""
    import math
    import re

    from tulip_mega.config import load_config
    from tulip_mega.data_rate import HOST_CORE_SHARE
    from tulip_mega.plan import main as plan_main
    from tulip_mega.training.host_cpus import plan_host_cores

    assert plan_main([str(REPO / "recipes" / "tulip_1b.yaml"), "--nodes", "64"]) == 0
    printed = float(re.search(r"([\d.]+) CPU cores per loading rank", capsys.readouterr().out).group(1))
    cfg = load_config(str(REPO / "recipes" / "tulip_1b.yaml"), [])
    from tulip_mega.launch import resolve_layout

    got = plan_host_cores(cfg, resolve_layout(cfg, 512), 8)
    # `printed` is rounded to 0.01 core: equal unless it sits within that of a whole worker.
    assert got is not None and got >= 1 and abs(got - math.ceil(printed / HOST_CORE_SHARE)) <= 1


def test_host_cpu_report_warns_when_the_affinity_is_short():
    from tulip_mega.config import load_config
    from tulip_mega.training.host_cpus import host_cpu_report, tasks_per_node

    assert tasks_per_node({"SLURM_TASKS_PER_NODE": "8(x64)"}) == 8
    assert tasks_per_node({"LOCAL_WORLD_SIZE": "4", "SLURM_NTASKS_PER_NODE": "8"}) == 4
    assert tasks_per_node({}) == 1
    cfg = load_config(str(REPO / "recipes" / "tulip_1b.yaml"), ["data.threads=3", "data.reader_workers=2"])
    line, warning = host_cpu_report(cfg, 28, dali=True, plan_cores=5, omp_threads="19", torch_threads=19)
    assert line == ("host cpus: 28 cores in this rank's affinity, OMP_NUM_THREADS=19, torch threads 19; the rank "
                    "keeps 10 busy (training thread + data.threads 3 + host path 5 (data.reader_workers 2, plan 5) "
                    "+ prefetch 1)")
    assert warning is None
    _, warning = host_cpu_report(cfg, 1, dali=True, plan_cores=None, omp_threads="1", torch_threads=1)
    assert warning is not None and warning.startswith("this rank may use 1 CPU cores but keeps 7 busy")
    assert host_cpu_report(cfg, 1, dali=False, plan_cores=None, omp_threads="1", torch_threads=1)[1] is None
