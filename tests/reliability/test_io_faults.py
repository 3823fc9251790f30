"""Disk and I/O faults while a stage writes: a translation shard (ENOSPC), a training
checkpoint (a real full disk: a small tmpfs, where this machine lets the tests mount one) and a
manifest (EIO). Each stops the stage with one line naming the fault, exit 2, and leaves a store
from which the rerun resumes: the shards and checkpoints finished before the fault are reused,
and the result equals an uninterrupted run's."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import TINY, copy_store
from tests.reliability.test_bad_input import error_lines, run_cli

pytestmark = pytest.mark.reliability


def _records(store: str, stage: str, sets: list[str]) -> list[str]:
    from polyalign.stages.core.pipeline import load_pipeline

    pipe = load_pipeline(TINY, sets, store=store)
    art = pipe.store.open(stage, pipe.fingerprints()[stage])
    return sorted(json.dumps(r, sort_keys=True) for r in art.iter_records("data/*/*.jsonl"))


def _fail_nth(monkeypatch, n: int, code: int, match: str) -> list[str]:
    """os.replace in the store raises OSError(code) on its n-th call whose target path
    contains `match` (the atomic writers' last step); the calls that matched are listed."""
    from polyalign.stages.core import store

    real = os.replace
    seen: list[str] = []

    def replace(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if match in str(dst):
            seen.append(str(dst))
            if len(seen) == n:
                raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(store.os, "replace", replace)
    return seen


def test_a_full_disk_while_writing_a_shard_stops_cleanly_and_the_rerun_resumes(
        tiny_translated, tmp_path, monkeypatch, models_dir):
    store = copy_store(tiny_translated, tmp_path / "store", stages=("self_instruct",))
    seen = _fail_nth(monkeypatch, 3, errno.ENOSPC, "/shards/")
    code, _, err = run_cli(["stage", "translate", str(TINY), "--store", store])
    errors = error_lines(err)
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert "the disk is full (ENOSPC) on" in errors[0] and "/shards/" in errors[0] and "rerun to resume" in errors[0]
    assert len(seen) == 3
    left = [p for p in Path(store).rglob("*.tmp-*")]
    assert not left, left  # no half-written temporary left behind
    kept = {str(p) for p in Path(store).rglob("shards/*/*") if p.is_file()}
    assert len(kept) == 2  # the shards written before the fault

    monkeypatch.undo()
    seen_again = _fail_nth(monkeypatch, 10**9, errno.ENOSPC, "/shards/")  # counts only
    code, _, err = run_cli(["stage", "translate", str(TINY), "--store", store])
    assert code == 0, err[-2000:]
    assert seen_again and not kept & set(seen_again)  # the shards finished before the fault were not written again
    ref = copy_store(tiny_translated, tmp_path / "ref", stages=("self_instruct",))
    assert run_cli(["stage", "translate", str(TINY), "--store", ref])[0] == 0
    assert _records(store, "translate", []) == _records(ref, "translate", [])


def test_an_io_error_while_writing_the_manifest_stops_cleanly_and_the_rerun_commits(
        tiny_translated, tmp_path, monkeypatch, models_dir):
    store = copy_store(tiny_translated, tmp_path / "store")
    _fail_nth(monkeypatch, 1, errno.EIO, "manifest.json")
    code, _, err = run_cli(["stage", "sft", str(TINY), "--store", store, "--set", "sft.train.max_steps=2"])
    errors = error_lines(err)
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert "stage sft: the disk reported an I/O error (EIO) on" in errors[0] and "manifest.json" in errors[0]
    monkeypatch.undo()
    code, _, err = run_cli(["stage", "sft", str(TINY), "--store", store, "--set", "sft.train.max_steps=2"])
    assert code == 0, err[-2000:]
    assert "already trained" in err + _  # the model trained before the fault was kept, not trained again
    code, out, _ = run_cli(["status", str(TINY), "--store", store, "--json", "--set", "sft.train.max_steps=2"])
    assert {s["name"]: s["state"] for s in json.loads(out)["stages"]}["sft"] == "cached"


@pytest.fixture()
def small_disk(tmp_path):
    """A 48 MiB tmpfs (root and mount rights needed; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()[:120]}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_disk_that_fills_up_during_training_stops_at_a_checkpoint_and_the_rerun_resumes(
        tiny_translated, small_disk, tmp_path, models_dir):
    """A real ENOSPC: once checkpoint 4 is complete, another writer fills the disk; the next
    checkpoint cannot be written. The stage stops with one line; with space again, the rerun
    resumes from checkpoint 4 and trains to the end."""
    from polyalign.stages.core.pipeline import load_pipeline

    store = copy_store(tiny_translated, small_disk / "store")
    sets = ["sft.train.max_steps=12", "sft.save_steps=2"]
    pipe = load_pipeline(TINY, sets, store=store)
    ckpts = pipe.store.partial_dir("sft", pipe.fingerprints()["sft"]) / "checkpoints"
    filler = small_disk / "filler"
    stop = threading.Event()

    def fill_after_checkpoint_4() -> None:
        while not stop.is_set():
            if (ckpts / "checkpoint-4" / "trainer_state.json").is_file():
                with open(filler, "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * (1 << 20))
                            f.flush()
                    except OSError:
                        return
            stop.wait(0.01)

    thread = threading.Thread(target=fill_after_checkpoint_4, daemon=True)
    thread.start()
    try:
        code, _, err = run_cli(["stage", "sft", str(TINY), "--store", store, *[x for s in sets for x in ("--set", s)]])
    finally:
        stop.set()
        thread.join(5)
    errors = error_lines(err)
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert "stage sft: the disk is full (ENOSPC)" in errors[0], errors[0]
    filler.unlink()
    code, _, err = run_cli(["stage", "sft", str(TINY), "--store", store, *[x for s in sets for x in ("--set", s)]])
    assert code == 0, err[-3000:]
    m = pipe.store.open("sft", pipe.fingerprints()["sft"]).metrics
    assert m["global_step"] == 12 and m["resumed_from_step"] >= 4
