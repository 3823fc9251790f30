import json
import os

import pytest

from polyalign.stages.core.store import MANIFEST, CorruptArtifactError, Store


def make(store: Store, stage="s", fp="f" * 64, records=3):
    w = store.writer(stage, fp)
    w.write_jsonl("data/00000.jsonl", [{"id": i} for i in range(records)])
    w.metrics["records"] = records
    return w


def test_partial_is_not_complete_until_commit(tmp_path):
    store = Store(tmp_path)
    w = make(store)
    assert store.state("s", w.fingerprint) == "partial"
    art = w.commit({"stage": "s"})
    assert store.state("s", w.fingerprint) == "cached"
    assert art.records("data/*.jsonl") == [{"id": 0}, {"id": 1}, {"id": 2}]
    assert not store.partial_dir("s", w.fingerprint).exists()
    manifest = json.loads((art.path / MANIFEST).read_text())
    assert manifest["files"]["data/00000.jsonl"]["size"] > 0
    assert manifest["metrics"] == {"records": 3}


def test_no_temporary_files_survive_a_write(tmp_path):
    store = Store(tmp_path)
    w = make(store)
    assert sorted(p.name for p in (w.dir / "data").iterdir()) == ["00000.jsonl"]


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest", "fingerprint"])
def test_damaged_artifacts_are_never_complete(tmp_path, damage):
    store = Store(tmp_path)
    art = make(store).commit({"stage": "s"})
    data = art.path / "data" / "00000.jsonl"
    if damage == "truncate":
        data.write_text(data.read_text()[:5])
    elif damage == "delete":
        data.unlink()
    elif damage == "manifest":
        (art.path / MANIFEST).write_text("{not json")
    else:
        m = json.loads((art.path / MANIFEST).read_text())
        m["fingerprint"] = "0" * 64
        (art.path / MANIFEST).write_text(json.dumps(m))
    assert store.state("s", art.fingerprint) == "corrupt"
    with pytest.raises(CorruptArtifactError):
        store.open("s", art.fingerprint)


def test_deep_verification_catches_same_size_corruption(tmp_path):
    store = Store(tmp_path)
    art = make(store).commit({"stage": "s"})
    data = art.path / "data" / "00000.jsonl"
    raw = bytearray(data.read_bytes())
    raw[2] = ord("X") if raw[2] != ord("X") else ord("Y")
    data.write_bytes(bytes(raw))
    store.open("s", art.fingerprint)  # sizes still agree
    with pytest.raises(CorruptArtifactError):
        store.open("s", art.fingerprint, deep=True)


def test_recommit_replaces_a_corrupt_leftover(tmp_path):
    store = Store(tmp_path)
    art = make(store).commit({"stage": "s"})
    (art.path / "data" / "00000.jsonl").unlink()
    again = make(store, records=2).commit({"stage": "s"})
    assert store.state("s", again.fingerprint) == "cached"
    assert len(again.records("data/*.jsonl")) == 2
    assert any(p.name.startswith("f" * 64 + ".corrupt-") for p in (tmp_path / "s").iterdir())


def test_crash_between_manifest_and_rename_is_promoted(tmp_path):
    store = Store(tmp_path)
    art = make(store).commit({"stage": "s"})
    # as if the process died after writing the manifest but before the rename
    os.replace(art.path, store.partial_dir("s", art.fingerprint))
    assert store.state("s", art.fingerprint) == "partial"
    assert store.promote_partial("s", art.fingerprint)
    assert store.state("s", art.fingerprint) == "cached"


def test_stale_partial_manifest_is_not_promoted(tmp_path):
    store = Store(tmp_path)
    w = make(store)
    (w.dir / MANIFEST).write_text("{}")
    assert not store.promote_partial("s", w.fingerprint)
    w2 = store.writer("s", w.fingerprint)
    assert not (w2.dir / MANIFEST).exists()
    assert w2.exists("data/00000.jsonl")  # finished work is kept
    w2.commit({"stage": "s"})
    assert store.state("s", w.fingerprint) == "cached"


def test_store_root_from_env_flag_and_config(tmp_path, monkeypatch):
    from polyalign.stages.core.pipeline import load_pipeline
    from tests.conftest import TINY

    assert load_pipeline(TINY).store.root.name == "store-tiny"
    monkeypatch.setenv("POLYALIGN_STORE", str(tmp_path / "env"))
    assert load_pipeline(TINY).store.root == tmp_path / "env"
    assert load_pipeline(TINY, store=str(tmp_path / "flag")).store.root == tmp_path / "flag"
    os.environ.pop("POLYALIGN_STORE", None)
