"""A tampered store, case by case (the cases of the store's content check): what `status`,
`status --verify`, `stage` and `run` say, and that no tampered byte reaches a downstream
artifact. `run` checks the store before its flow starts, so the cases it refuses cost no Prefect
run; the two it lets through (a tamper only a hash finds, a file dropped in) run the flow and
are in the slow tier."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import TINY, copy_store
from tests.reliability.test_bad_input import error_lines, run_cli

pytestmark = pytest.mark.reliability

SFT = ["--set", "sft.train.max_steps=2"]


def _translate_dir(store: Path) -> Path:
    return next(d for d in (store / "translate").iterdir() if d.is_dir() and not d.name.endswith(".partial"))


def _manifest(store: Path) -> tuple[Path, dict]:
    path = _translate_dir(store) / "manifest.json"
    return path, json.loads(path.read_text())


def _same_size_edit(store: Path) -> None:
    shard = sorted((_translate_dir(store) / "data" / "fr").glob("*.jsonl"))[0]
    data = bytearray(shard.read_bytes())
    i = data.index(b'"instruction": "') + len(b'"instruction": "')
    data[i] = ord("Z") if data[i] != ord("Z") else ord("Y")  # one letter, same size, still JSON
    shard.write_bytes(bytes(data))


def _dropped_in(store: Path) -> None:
    row = {"id": "planted", "lang": "fr", "split": "train", "instruction": "PLANTED", "input": "", "output": "PLANTED"}
    (_translate_dir(store) / "data" / "fr" / "99999.jsonl").write_text(json.dumps(row) + "\n")


def _edit_manifest(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(store: Path) -> None:
        path, manifest = _manifest(store)
        new = edit(manifest)
        path.write_text(json.dumps(manifest if new is None else new))
    return apply


def _garbage_partial(store: Path) -> None:
    from polyalign.stages.core.pipeline import load_pipeline

    pipe = load_pipeline(TINY, SFT[1:], store=str(store))
    partial = pipe.store.partial_dir("sft", pipe.fingerprints()["sft"])
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"\xff\xfe not a folder")


# case -> (tamper, the stage it damages, what cheap `status` says, what `status --verify` says,
#          a piece of the one line `stage sft` and `run` print, or None when they succeed)
CASES = {
    "same-size edit of a shard": (_same_size_edit, "translate", "cached", "corrupt", "sha256"),
    "a shard dropped in": (_dropped_in, "translate", "cached", "corrupt", None),
    "a manifest listing no files": (_edit_manifest(lambda m: m.update(files={})), "translate", "corrupt", "corrupt", "is corrupt"),
    "a manifest entry outside the artifact": (
        _edit_manifest(lambda m: m["files"].update({"../../etc/passwd": {"size": 1, "sha256": "0" * 64}})),
        "translate", "corrupt", "corrupt", "leaves the artifact"),
    "a manifest that is a list": (_edit_manifest(lambda m: [m]), "translate", "corrupt", "corrupt", "manifest is a list"),
    "a manifest entry without a size": (
        _edit_manifest(lambda m: next(iter(m["files"].values())).pop("size")), "translate", "corrupt", "corrupt", "is corrupt"),
    "a work folder that is a file": (_garbage_partial, "sft", "partial", "partial", "is not a folder"),
}
SLOW_RUN = {"same-size edit of a shard", "a shard dropped in"}


@pytest.fixture()
def tampered(request, tiny_translated, tmp_path, models_dir):
    name = request.param
    store = Path(copy_store(tiny_translated, tmp_path / "store"))
    CASES[name][0](store)
    return name, store


def _one_error(code: int, err: str) -> str:
    lines = error_lines(err)
    assert code == 2 and "Traceback" not in err and len(lines) == 1, (code, err[-2000:])
    return lines[0]


@pytest.mark.parametrize("tampered", list(CASES), indirect=True)
def test_status_and_verify_name_the_damage(tampered):
    name, store = tampered
    _, stage, cheap, deep, _ = CASES[name]
    states = {}
    for flag in ([], ["--verify"]):
        code, out, err = run_cli(["status", str(TINY), "--store", str(store), "--json", *flag, *SFT])
        assert code == 0 and "Traceback" not in err, err[-2000:]
        states[bool(flag)] = {s["name"]: s for s in json.loads(out)["stages"]}[stage]
    assert (states[False]["state"], states[True]["state"]) == (cheap, deep), states
    if deep == "corrupt":
        assert states[True]["problem"], states[True]  # the one line that says why


@pytest.mark.parametrize("tampered", list(CASES), indirect=True)
def test_stage_refuses_or_reads_only_listed_bytes(tampered, tiny_translated, tmp_path):
    name, store = tampered
    message = CASES[name][4]
    code, _, err = run_cli(["stage", "sft", str(TINY), "--store", str(store), *SFT])
    if message is not None:
        line = _one_error(code, err)
        assert message in line, line
        if CASES[name][1] == "translate":  # the damaged artifact, and how to rebuild it
            assert "artifact translate/" in line and f"polyalign clean translate {TINY}" in line, line
        return
    assert code == 0, err[-2000:]
    _no_planted_bytes_downstream(store, Path(copy_store(tiny_translated, tmp_path / "clean")))


def _no_planted_bytes_downstream(store: Path, clean: Path) -> None:
    """sft trained on exactly the records of an untampered copy: the file dropped in was never read."""
    from polyalign.stages.core.pipeline import load_pipeline

    assert run_cli(["stage", "sft", str(TINY), "--store", str(clean), *SFT])[0] == 0
    got, want = (load_pipeline(TINY, SFT[1:], store=str(s)) for s in (store, clean))
    a = got.store.open("sft", got.fingerprints()["sft"], deep=True).metrics
    b = want.store.open("sft", want.fingerprints()["sft"], deep=True).metrics
    assert a["examples_per_language"] == b["examples_per_language"] and a["examples"] == b["examples"]


@pytest.mark.parametrize("tampered", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_RUN else n for n in CASES],
                         indirect=True)
def test_run_stops_before_its_flow_or_reads_only_listed_bytes(tampered, prefect_harness, tiny_translated, tmp_path):
    name, store = tampered
    message = CASES[name][4]
    code, _, err = run_cli(["run", str(TINY), "--until", "sft", "--store", str(store), *SFT])
    if message is not None:
        assert message in _one_error(code, err)
        return
    assert code == 0, err[-2000:]
    _no_planted_bytes_downstream(store, Path(copy_store(tiny_translated, tmp_path / "clean")))
