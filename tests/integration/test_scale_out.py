"""Scale-out on existing engines: the translate fan-out on a real Dask LocalCluster; the tiny DAG
with its store in a bucket of a local S3-compatible server (moto), killed mid-run and resumed;
two runs of one config at once on one store. The three end-to-end ones are the `scale` tier
(`make test-scale`, about 5 minutes on 2 cores); the store checks run by default."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polyalign.stages.core.pipeline import load_pipeline
from tests.conftest import ROOT, TINY, cli

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------------- dask


@pytest.mark.scale
def test_translate_fans_out_on_a_dask_local_cluster(prefect_harness, tmp_path):
    distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
    pytest.importorskip("prefect_dask", reason="the dask extra is not installed")
    from distributed.diagnostics.plugin import SchedulerPlugin

    from polyalign.flows.pipeline import polyalign_flow

    class Placements(SchedulerPlugin):
        """Which worker computed each task (recorded in the scheduler, in this process)."""

        def __init__(self) -> None:
            self.done: dict[str, str] = {}

        def transition(self, key, start, finish, *args, **kwargs):  # noqa: ANN001
            if finish == "memory" and kwargs.get("worker"):
                self.done[str(key)] = kwargs["worker"]

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        placements = Placements()
        cluster.scheduler.add_plugin(placements)
        overrides = ["task_runner.kind=dask", f"task_runner.address={cluster.scheduler_address}", "retries.delay_seconds=0"]
        states = polyalign_flow(str(TINY), overrides, "translate", str(tmp_path / "store"))
        workers = set(cluster.scheduler.workers)
    assert states == {"self_instruct": "Completed", "translate": "Completed"}
    units = {k: w for k, w in placements.done.items() if k.startswith("unit_task")}
    stages = {k: w for k, w in placements.done.items() if k.startswith("stage_task")}
    assert len(units) == 2 and len(stages) == 2, placements.done  # translate[fr], translate[de]; two stage tasks
    assert set(units.values()) | set(stages.values()) <= workers  # computed by the cluster's worker processes
    pipe = load_pipeline(TINY, store=str(tmp_path / "store"))
    art = pipe.store.open("translate", pipe.fingerprints()["translate"])
    assert {rel.split("/")[1] for rel in art.listed("data/*/*.jsonl")} >= {"fr", "de"}


def test_a_dask_runner_without_its_extra_is_a_one_line_error(monkeypatch, tmp_path):
    import builtins

    from polyalign.flows.pipeline import _engine_runner
    from polyalign.stages.core.errors import UserError

    real = builtins.__import__

    def no_prefect_dask(name, *args, **kwargs):  # noqa: ANN001
        if name.startswith("prefect_dask"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prefect_dask)
    with pytest.raises(UserError, match=r"task_runner: dask needs prefect-dask: pip install 'polyalign\[dask\]'"):
        _engine_runner(load_pipeline(TINY, ["task_runner=dask"], store=str(tmp_path)))


# ----------------------------------------------------------------------------- s3 (moto)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3(tmp_path, monkeypatch):
    """A moto S3 server on 127.0.0.1 with an empty bucket; yields (env for subprocesses, url)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    creds = {
        "AWS_ACCESS_KEY_ID": "polyalign-test-key", "AWS_SECRET_ACCESS_KEY": "polyalign-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "POLYALIGN_STORE_CACHE": str(tmp_path / "cache"),
    }
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("polyalign-test")
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    try:
        yield env, "s3://polyalign-test/runs"
    finally:
        server.stop()


def _bucket(url: str) -> dict[str, int]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    base = url.removeprefix("s3://")
    return {k[len(base) + 1:]: int(v["size"]) for k, v in fs.find(base, detail=True).items()}


@pytest.mark.scale
def test_the_tiny_dag_in_a_bucket_is_killed_mid_run_and_resumes(s3, tmp_path):
    env, url = s3
    until = ["--until", "sft", "--set", "translate.batch_size=1"]  # runtime only: same fingerprints, slower
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyalign", "run", str(TINY), "--store", url, *until],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    pipe = load_pipeline(TINY, store=url)
    fps = pipe.fingerprints()
    units = pipe.store.partial_dir("translate", fps["translate"]) / "_units"  # in this machine's cache
    deadline = time.monotonic() + 400
    # kill -9 once self_instruct is in the bucket and one translate unit is done in the cache
    while not (units.is_dir() and any(units.glob("*.json"))):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "timed out waiting for the kill point"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in units.glob("*.json")}
    objects = _bucket(url)
    assert f"self_instruct/{fps['self_instruct']}/manifest.json" in objects
    assert not any(k.startswith(("translate/", "sft/")) for k in objects)  # nothing half-made in the bucket
    manifest = json.loads(pipe.store.fs.cat_file(f"{url}/self_instruct/{fps['self_instruct']}/manifest.json"))
    for rel, meta in manifest["files"].items():  # manifest last: what it lists is there, with its size
        assert objects[f"self_instruct/{fps['self_instruct']}/{rel}"] == meta["size"]

    resumed = cli("run", str(TINY), "--store", url, *until, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[self_instruct: Cached]" in resumed.stdout and "[translate: Completed]" in resumed.stdout
    kept = pipe.store.open("translate", fps["translate"]).path / "_units"
    assert {name: (kept / name).stat().st_mtime_ns for name in done} == done  # the finished unit was not redone
    objects = _bucket(url)
    assert f"sft/{fps['sft']}/manifest.json" in objects

    # the bucket is the source of truth: a machine with an empty cache finds every stage there
    shutil.rmtree(env["POLYALIGN_STORE_CACHE"])
    status = cli("status", str(TINY), "--store", url, "--json", env=env)
    assert status.returncode == 0, status.stderr[-2000:]
    states = {row["name"]: row["state"] for row in json.loads(status.stdout)["stages"]}
    assert [states[s] for s in ("self_instruct", "translate", "sft")] == ["cached"] * 3
    again = cli("run", str(TINY), "--store", url, *until, env=env, timeout=600)
    assert again.returncode == 0 and again.stdout.count(": Cached]") == 3, again.stdout[-2000:]


def test_a_remote_artifact_is_complete_only_when_its_manifest_matches_its_files(tmp_path, monkeypatch):
    from polyalign.stages.core.errors import CorruptArtifactError
    from polyalign.stages.core.store import open_store

    monkeypatch.setenv("POLYALIGN_STORE_CACHE", str(tmp_path / "cache"))
    url, fp = f"memory://polyalign-{tmp_path.name}/runs", "ab" * 32
    store = open_store(url)
    written: list[str] = []
    for name in ("put_file", "pipe_file"):  # record the order of uploads, then upload for real
        real = getattr(store.fs, name)
        monkeypatch.setattr(store.fs, name, lambda path, *a, _real=real, **k: (written.append(str(path)), _real(path, *a, **k))[1])
    w = store.writer("stage", fp)
    w.write_jsonl("data/a.jsonl", [{"x": 1}, {"x": 2}])
    w.write_json("metrics.json", {"n": 2})
    w.commit({"summary": "two records"})
    assert [p.rsplit("/", 1)[1] for p in written if "/stage/" in p] == ["a.jsonl", "metrics.json", "manifest.json"]
    # a crash part-way through an upload leaves files and no manifest: nothing is there
    store.fs.rm_file(f"{url}/stage/{fp}/manifest.json")
    monkeypatch.setenv("POLYALIGN_STORE_CACHE", str(tmp_path / "other-machine"))
    fresh = open_store(url)
    assert fresh.diagnose("stage", fp) == ("missing", None)
    # the local copy of a committed artifact is uploaded again when the bucket lacks it
    assert store.open("stage", fp).records("data/*.jsonl") == [{"x": 1}, {"x": 2}]
    assert store.fs.exists(f"{url}/stage/{fp}/manifest.json")
    # a file that no longer matches the manifest makes the artifact corrupt, never cached
    store.fs.pipe_file(f"{url}/stage/{fp}/data/a.jsonl", b'{"x": 3}\n')
    shutil.rmtree(tmp_path / "other-machine", ignore_errors=True)
    fresh = open_store(url)
    state, why = fresh.diagnose("stage", fp)
    assert state == "corrupt" and "data/a.jsonl is missing or has the wrong size" in why
    with pytest.raises(CorruptArtifactError, match="polyalign clean stage CONFIG --store memory://"):
        fresh.open("stage", fp)


# ----------------------------------------------------------------------------- two runs at once


@pytest.mark.scale
def test_two_runs_of_one_config_at_once_share_the_store(tmp_path):
    env = dict(os.environ, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    store = str(tmp_path / "store")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "polyalign", "run", str(TINY), "--store", store, "--until", "sft"],
            cwd=ROOT, env=dict(env, PREFECT_HOME=str(tmp_path / f"prefect-{i}")), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    pipe = load_pipeline(TINY, store=store)
    fps = pipe.fingerprints()
    for stage in ("self_instruct", "translate", "sft"):
        folder = Path(store) / stage
        # one artifact, whole, and no work folder or set-aside copy left behind
        assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == [fps[stage]]
        pipe.store.open(stage, fps[stage], deep=True)
    # each stage was computed once: whichever run came second found it done
    made = sum(out.count(": Completed]") for out, _ in outs)
    reused = sum(out.count(": Cached]") for out, _ in outs)
    assert (made, reused) == (3, 3), [o for o, _ in outs]
