"""kill -9 in the middle of translate (inside the Prefect flow) and of sft; the reruns
resume without redoing finished shards or checkpoints and end with the same records as an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polyalign.stages.core.pipeline import load_pipeline
from tests.conftest import ROOT, TINY, cli, copy_store

pytestmark = pytest.mark.integration


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "polyalign", *args],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: kill -9 takes the Prefect server too
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"process ended before it could be killed:\n{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("timed out waiting for the kill point")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*.json*") if p.is_file()}


@pytest.fixture()
def env(tmp_path):
    e = dict(os.environ)
    e["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    e["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    return e


def test_kill_during_translate_then_resume(tmp_path, env, tiny_translated):
    store = copy_store(tiny_translated, tmp_path / "store", ("self_instruct",))
    ref_store = copy_store(tiny_translated, tmp_path / "ref", ("self_instruct",))
    slow = ["--set", "translate.batch_size=1"]  # runtime-only: same fingerprint, slower
    pipe = load_pipeline(TINY, store=store)
    fp = pipe.fingerprints()["translate"]
    partial = pipe.store.partial_dir("translate", fp)

    proc = _spawn(["run", str(TINY), "--until", "translate", "--store", store, *slow], env)
    _kill_when(proc, lambda: (partial / "shards" / "fr" / "00001.json").exists())
    assert pipe.store.state("translate", fp) == "partial"
    # a shard is done once its marker shards/<lang>/<k>.json is written (after its data and
    # quarantine files): files of a shard cut off before its marker are rightly redone, and
    # request journals are work in progress (removed when the artifact is committed)
    def finished(rel: str) -> bool:
        kind, lang, name = (rel.split("/") + ["", ""])[:3]
        return kind == "shards" or (kind in ("data", "quarantine") and (partial / "shards" / lang / (name.split(".")[0] + ".json")).exists())

    done_before = {k: v for k, v in _snapshot(partial).items() if finished(k)}
    assert any(k.startswith("data/") for k in done_before)

    rerun = cli("run", str(TINY), "--until", "translate", "--store", store, *slow, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stderr + rerun.stdout
    art = pipe.store.open("translate", fp)
    after = _snapshot(art.path)
    for rel, ident in done_before.items():  # finished shards were kept, not rewritten
        assert after[rel] == ident, rel

    cli("stage", "translate", str(TINY), "--store", ref_store, *slow, check=True, env=env)
    ref = load_pipeline(TINY, store=ref_store).store.open("translate", fp)
    for pattern in ("data/*/*.jsonl", "quarantine/*/*.jsonl"):
        ids = sorted(r["id"] for r in art.records(pattern))
        assert ids == sorted(r["id"] for r in ref.records(pattern))
        assert len(ids) == len(set(ids))
    assert art.metrics["translated"] == ref.metrics["translated"]


def test_kill_during_sft_then_resume_from_checkpoint(tmp_path, env, tiny_translated):
    store, ref_store = copy_store(tiny_translated, tmp_path / "store"), copy_store(tiny_translated, tmp_path / "ref")
    longer = ["--set", "sft.train.max_steps=60"]
    pipe = load_pipeline(TINY, longer[1:], store=store)
    fp = pipe.fingerprints()["sft"]
    ckpts = pipe.store.partial_dir("sft", fp) / "checkpoints"

    def complete_checkpoints() -> list[int]:
        done = []
        for d in ckpts.glob("checkpoint-*"):
            try:
                json.loads((d / "trainer_state.json").read_text())
                done.append(int(d.name.split("-")[1]))
            except (OSError, ValueError):
                pass
        return sorted(done)

    proc = _spawn(["stage", "sft", str(TINY), "--store", store, *longer], env)
    _kill_when(proc, lambda: bool(complete_checkpoints()) and complete_checkpoints()[-1] >= 6)
    at_kill = complete_checkpoints()[-1]
    assert pipe.store.state("sft", fp) == "partial"
    # a checkpoint holds what resuming reads, not a copy of the base model's tokenizer
    held = {p.name for p in (ckpts / f"checkpoint-{at_kill}").iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= held
    assert not held & {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"}, held

    rerun = cli("stage", "sft", str(TINY), "--store", store, *longer, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    m = pipe.store.open("sft", fp).metrics
    assert m["resumed_from_step"] >= at_kill  # no finished checkpoint was redone
    assert m["global_step"] == 60
    # the efficiency report's time covers the killed run too, not only the resumed one
    assert m["attempts"] == 2 and m["efficiency"]["wall_seconds"] == m["wall_seconds"] > m["wall_seconds_last_attempt"]

    cli("stage", "sft", str(TINY), "--store", ref_store, *longer, check=True, env=env)
    ref = load_pipeline(TINY, longer[1:], store=ref_store).store.open("sft", fp).metrics
    assert ref["resumed_from_step"] == 0
    assert (m["examples"], m["examples_per_language"]) == (ref["examples"], ref["examples_per_language"])

