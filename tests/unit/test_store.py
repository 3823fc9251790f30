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


# ---------------------------------------------------------------------------------------
# tampering: "complete exactly when the manifest matches its files"


def _manifest(art):
    return json.loads((art.path / MANIFEST).read_text())


def _write_manifest(art, m):
    (art.path / MANIFEST).write_text(json.dumps(m))


def _same_size_edit(path):
    raw = bytearray(path.read_bytes())
    raw[2] = ord("X") if raw[2] != ord("X") else ord("Y")
    path.write_bytes(bytes(raw))


def test_a_same_size_edit_is_caught_when_read(tmp_path):
    store = Store(tmp_path)
    art = make(store).commit({"stage": "s"})
    _same_size_edit(art.path / "data" / "00000.jsonl")
    art = store.open("s", art.fingerprint)  # cheap open: sizes agree
    with pytest.raises(CorruptArtifactError, match=r"s/f{16} .* data/00000.jsonl does not match its sha256; run `polyalign clean s"):
        art.records("data/*.jsonl")
    with pytest.raises(CorruptArtifactError, match="does not match its sha256"):
        art.read_bytes("data/00000.jsonl")


def test_a_dropped_in_shard_is_never_read_and_fails_deep_verification(tmp_path):
    store = Store(tmp_path)
    art = make(store).commit({"stage": "s"})
    (art.path / "data" / "00001.jsonl").write_text('{"id": "evil"}\n')
    assert [r["id"] for r in store.open("s", art.fingerprint).records("data/*.jsonl")] == [0, 1, 2]
    with pytest.raises(CorruptArtifactError, match="data/00001.jsonl is not listed"):
        store.open("s", art.fingerprint, deep=True)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: m.update(files={}), "lists no 'data/\\*.jsonl'"),
        (lambda m: m["files"].update({"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}), "leaves the artifact"),
        (lambda m: m["files"].update({"/etc/passwd": {"size": 1, "sha256": "0" * 64}}), "absolute path"),
        (lambda m: m["files"]["data/00000.jsonl"].pop("size"), "invalid 'size'"),
        (lambda m: m["files"]["data/00000.jsonl"].update(sha256="abc"), "invalid 'sha256'"),
        (lambda m: m.update(files=["data/00000.jsonl"]), "no 'files' table"),
        (lambda m: m.update(metrics=[1]), "'metrics' is not an object"),
    ],
)
def test_a_manifest_that_breaks_the_schema_is_corrupt_never_cached(tmp_path, edit, reason):
    store = Store(tmp_path)
    art = make(store).commit({"stage": "s"})
    m = _manifest(art)
    edit(m)
    _write_manifest(art, m)
    required = ("data/*.jsonl",)
    assert store.state("s", art.fingerprint, required=required) == "corrupt"
    with pytest.raises(CorruptArtifactError, match=reason):
        store.open("s", art.fingerprint, required=required)


def test_a_manifest_that_is_a_list_is_corrupt(tmp_path):
    store = Store(tmp_path)
    art = make(store).commit({"stage": "s"})
    (art.path / MANIFEST).write_text("[1, 2]")
    assert store.state("s", art.fingerprint) == "corrupt"
    with pytest.raises(CorruptArtifactError, match="manifest is a list"):
        store.open("s", art.fingerprint)


def test_a_model_folder_is_verified_whole_and_once(tmp_path, monkeypatch):
    from polyalign.stages.core import store as store_mod

    store = Store(tmp_path)
    w = store.writer("s", "a" * 64)
    w.write_text("model/config.json", "{}")
    w.write_text("model/weights.bin", "0123456789")
    art = w.commit({"stage": "s"})
    assert art.file("model") == art.path / "model"
    calls = []
    real = store_mod.file_digest
    monkeypatch.setattr(store_mod, "file_digest", lambda p: calls.append(p) or real(p))
    art.file("model")
    assert calls == []  # unchanged since verified: not hashed again
    _same_size_edit(art.path / "model" / "weights.bin")
    with pytest.raises(CorruptArtifactError, match="model/weights.bin does not match"):
        art.file("model")
    (art.path / "model" / "weights.bin").write_text("0123456789")
    (art.path / "model" / "extra.safetensors").write_text("x")
    with pytest.raises(CorruptArtifactError, match="model/extra.safetensors is not listed"):
        art.file("model")


def test_garbage_in_a_partial_folder_names_the_file_and_the_way_out(tmp_path):
    from polyalign.stages.core.errors import CorruptPartialError

    store = Store(tmp_path, config="configs/x.yaml")
    w = store.writer("s", "b" * 64)
    w.path("shards/fr/00000.json").write_bytes(b"\xff\xfe garbage \x00")
    with pytest.raises(CorruptPartialError) as exc:
        w.read_json("shards/fr/00000.json")
    msg = str(exc.value)
    assert "shards/fr/00000.json" in msg and "polyalign clean s configs/x.yaml" in msg and "\n" not in msg
    w.path("data/00000.jsonl").write_text("{not json\n")
    with pytest.raises(CorruptPartialError, match="data/00000.jsonl"):
        w.records("data/*.jsonl")
    # a partial "folder" that is a file
    store.partial_dir("s", "c" * 64).write_text("junk")
    with pytest.raises(CorruptPartialError, match="is not a folder"):
        store.writer("s", "c" * 64)


def test_an_invalid_partial_manifest_is_not_promoted(tmp_path):
    store = Store(tmp_path)
    w = make(store)
    (w.dir / MANIFEST).write_text(json.dumps({"fingerprint": w.fingerprint, "files": {"../x": {"size": 1, "sha256": "0" * 64}}}))
    assert not store.promote_partial("s", w.fingerprint)
    assert not (w.dir / MANIFEST).exists()


def test_the_store_root_is_checked_up_front(tmp_path):
    from polyalign.stages.core.errors import StoreError
    from polyalign.stages.core.pipeline import load_pipeline
    from tests.conftest import TINY

    with pytest.raises(StoreError, match="empty path"):
        Store("  ")
    with pytest.raises(StoreError, match="--store: empty path"):
        load_pipeline(TINY, store="")
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(StoreError, match="is not a folder"):
        Store(afile).check_root(writable=False)
    with pytest.raises(StoreError, match="not writable"):
        Store(afile / "sub").check_root(writable=True)
    Store(tmp_path / "new").check_root(writable=True)
    assert (tmp_path / "new").is_dir()


def test_clean_removes_one_fingerprint_or_all(tmp_path):
    store = Store(tmp_path)
    a = make(store, fp="a" * 64).commit({"stage": "s"})
    (a.path.with_name(a.path.name + ".corrupt-1")).mkdir()
    make(store, fp="b" * 64)
    removed = {p.name for p in store.remove("s", "a" * 64)}
    assert removed == {"a" * 64, "a" * 64 + ".corrupt-1"}
    assert store.partial_dir("s", "b" * 64).exists()
    assert store.remove("s") and not any((tmp_path / "s").iterdir())


def test_odd_manifests_are_corrupt_not_tracebacks(tmp_path):
    store = Store(tmp_path)
    art = make(store).commit({"stage": "s", "summary": "ok"})
    m = _manifest(art)
    m["files"]["x" * 5000] = {"size": 1, "sha256": "0" * 64}  # longer than any file name
    _write_manifest(art, m)
    assert store.state("s", art.fingerprint) == "corrupt"
    m["files"].pop("x" * 5000)
    m["summary"] = 5
    _write_manifest(art, m)
    with pytest.raises(CorruptArtifactError, match="'summary' is not a string"):
        store.open("s", art.fingerprint)


def test_alternatives_in_declared_outputs(tmp_path):
    store = Store(tmp_path)
    w = store.writer("s", "d" * 64)
    w.write_text("model/README.md", "no weights")
    art = w.commit({"stage": "s"})
    need = ("model/adapter_config.json|model/config.json",)
    assert store.state("s", art.fingerprint, required=need) == "corrupt"
    w = store.writer("s", "e" * 64)
    w.write_text("model/config.json", "{}")
    assert store.state("s", w.commit({"stage": "s"}).fingerprint, required=need) == "cached"


def test_markers_of_the_wrong_shape_are_named(tmp_path):
    from polyalign.stages.core.errors import CorruptPartialError

    store = Store(tmp_path, config="c.yaml")
    w = store.writer("s", "f" * 64)
    w.write_json("shards/fr/00000.json", [])
    with pytest.raises(CorruptPartialError, match=r"00000.json: .*expected an object.*delete that file to redo its part"):
        w.read_json("shards/fr/00000.json", keys=("kept",))
    w.write_json("shards/fr/00001.json", {"kept": "3"})
    with pytest.raises(CorruptPartialError, match="no number 'kept'"):
        w.read_json("shards/fr/00001.json", keys=("kept",))
    w.write_jsonl("quarantine/fr/00000.jsonl", [{"id": 1}])
    with pytest.raises(CorruptPartialError, match=r"record 1 is not an object with reason\); run `polyalign clean s c.yaml --store"):
        w.records("quarantine/fr/*.jsonl", keys=("reason",))
