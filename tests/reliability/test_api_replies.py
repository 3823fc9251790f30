"""Bad replies from an OpenAI-compatible server, kind by kind: the API-reply family of the
bad-input suite. The server is tests/openai_server.py (real HTTP on 127.0.0.1); its teacher is
scripted, so every reply is known and a faulty run can be compared with a clean one.

Three groups, all on the translate stage of configs/tiny-api.yaml (run in this process):
- transport: one request keeps failing (429, 500, 503, too slow, dropped, malformed JSON, no
  choices, a choice without text, an HTML page): the stage stops with one line that names the
  model, the request and the cause (exit 2); run again on a healthy server, it asks only for
  that request and its records equal a clean run's;
- refusals (400, 401, 403, 404): one line at the first refusal, exit 2, the key never shown;
  nothing committed, and a rerun completes;
- content: a reply that arrives but cannot be kept (empty, cut by the token budget, the source
  echoed, a loop, far too long, in English, a masked span lost) quarantines its record with
  the reason, and kept + quarantined = input.
One more case runs a failing request through `run` (a Prefect flow, where translate's
languages are fan-out units): the unit's own line reaches the user, exit 2."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from polyalign.stages.core.model_specs import ModelSpec, TinySpec, models_dir
from polyalign.stages.core.pipeline import load_pipeline
from polyalign.stages.core.prepare import ensure_model
from tests.conftest import ROOT
from tests.openai_server import Faults, ModelServer
from tests.reliability.test_bad_input import error_lines, run_cli

pytestmark = pytest.mark.reliability
API = ROOT / "configs" / "tiny-api.yaml"
CANARY = "sk-polyalign-canary-api-replies-51c0"

GOOD = [  # (instruction, input, output); every instruction a different subject
    ("Describe volcanic soils for a curious child.", "<noinput>", "Dark earth keeps the vines alive."),
    ("Compare medieval guilds with modern trade unions.", "<noinput>", "Both guard the members of one trade."),
    ("Summarize these notes about tidal energy.", "Notes on tides and turbines.", "Tides turn turbines twice a day."),
]
# a marker word in the instruction makes the scripted teacher's translation of that field bad
CONTENT = {  # marker: (what the reply is, the reason the record is quarantined with)
    "EMPTYREPLY": ("nothing at all", "instruction: empty translation"),
    "CUTREPLY": ("cut by the token budget", "instruction: truncated at max_new_tokens"),
    "ECHOREPLY": ("the English source", "instruction: untranslated (identical to the source)"),
    "LOOPREPLY": ("a loop", "instruction: repetition loop"),
    "LONGREPLY": ("twenty times too long", "instruction: length ratio"),
    "ENGLISHREPLY": ("other English prose", "instruction: language identified as en"),
    "MARKERREPLY": ("French without the masked number", "instruction: masked number [[1]] lost in translation"),
}
SUBJECTS = ["honeybee colonies", "jazz harmony", "desert cities", "paper money", "river ferries", "glass blowing", "sea salt"]
TASKS = GOOD + [
    # an empty reply to a field with a masked span is reported as the span lost: no date there
    (f"Explain {marker} the history of {subject}{'' if marker == 'EMPTYREPLY' else ' on 3 May'}.", "<noinput>", f"A short account of {subject}.")
    for marker, subject in zip(CONTENT, SUBJECTS)
]
FRENCH = "le chat dort sur la chaise pendant que nous parlons de la ville et du temps qu'il fait".split()
SETS = [
    "self_instruct.method=alpaca", "self_instruct.round_size=1", "self_instruct.max_rounds=1",
    "self_instruct.num_instructions=100", "self_instruct.min_words=4", "self_instruct.heldout_fraction=0",
    "languages=[fr]", "preferences.languages=[fr]", "evaluate.languages=[en, fr]",
    "translate.shard_size=64", "translate.max_new_tokens=200", "translate.checks=[echo, length, language, repetition]", "translate.mask=[number]",
    "translate.keep_truncated=false", "translate.min_length_ratio=null", "translate.max_length_ratio=null",
    "models.teacher.openai.api_key_env=POLYALIGN_TEST_KEY", "models.teacher.openai.max_retries=1",
    "models.teacher.openai.backoff=0.01", "models.teacher.openai.max_backoff=0.05", "models.teacher.openai.timeout=0.5",
]


def _source(body: dict) -> str:
    """The English text a translation request asks for ('' for any other request)."""
    prompt = str(body.get("prompt") or "")
    return prompt.rsplit("English: ", 1)[1].rsplit("\nFrench:", 1)[0] if prompt.endswith("\nFrench:") else ""


def _teacher(key: str, body: dict, chat: bool) -> str | tuple[str, str] | None:
    """The Alpaca list of TASKS, then translations into French: as many French words as the
    English has, the masked markers kept in order; a marker word makes the reply bad."""
    if chat:
        return None
    prompt = body["prompt"]
    if "/tasks/" in key:
        first = int(prompt.rsplit("###\n", 1)[1].split(".", 1)[0])
        blocks = [f"{first + k}. Instruction: {a}\n{first + k}. Input:\n{b}\n{first + k}. Output:\n{c}" for k, (a, b, c) in enumerate(TASKS)]
        return "\n###\n".join(blocks)[len(f"{first}. Instruction:"):]
    source = _source(body)
    markers = " ".join(re.findall(r"\[\[\d+\]\]", source))
    words = [FRENCH[n % len(FRENCH)] for n in range(len(re.sub(r"\[\[\d+\]\]", " ", source).split()))]
    french = " " + " ".join(words) + (" " + markers if markers else "") + "."
    if "EMPTYREPLY" in source:
        return ""
    if "CUTREPLY" in source:
        return french[: len(french) // 2], "length"
    if "ECHOREPLY" in source:
        return " " + source
    if "LOOPREPLY" in source:
        return " " + "encore et " * 15 + markers
    if "LONGREPLY" in source:
        return " " + " ".join(FRENCH * 6) + " " + markers
    if "ENGLISHREPLY" in source:
        return " The weather was mild all week and the children walked along the river with their friends " + markers
    if "MARKERREPLY" in source:
        return " " + " ".join(words) + "."
    return french


@pytest.fixture(scope="module")
def server():
    path = ensure_model(ModelSpec(tiny=TinySpec(seed=1)), models_dir())
    srv = ModelServer(path, "tiny-teacher", Faults(rate=0.0, slow_seconds=1.5, retry_after="1")).start()
    srv.script = _teacher
    yield srv
    srv.stop()


def _sets(server: ModelServer) -> list[str]:
    return [*SETS, f"models.teacher.openai.base_url={server.base_url}"]


def _args(server: ModelServer, command: str, store: Path) -> list[str]:
    return [*command.split(), str(API), "--store", str(store), *[x for s in _sets(server) for x in ("--set", s)]]


def _pipe(server: ModelServer, store: Path):  # noqa: ANN202
    return load_pipeline(API, _sets(server), store=str(store), check_models=False)


def _records(server: ModelServer, store: Path) -> dict[str, list[dict]]:
    pipe = _pipe(server, store)
    art = pipe.store.open("translate", pipe.fingerprints()["translate"])
    return {p: sorted(art.records(p), key=lambda r: r["id"]) for p in ("data/fr/*.jsonl", "quarantine/fr/*.jsonl")}


@pytest.fixture(scope="module")
def english(server, tmp_path_factory):
    """A store holding the English records (self_instruct through the scripted teacher)."""
    store = tmp_path_factory.mktemp("api-replies") / "english"
    mp = pytest.MonkeyPatch()
    mp.setenv("POLYALIGN_TEST_KEY", CANARY)
    try:
        code, _, err = run_cli(_args(server, "stage self_instruct", store))
    finally:
        mp.undo()
    assert code == 0, err[-3000:]
    pipe = _pipe(server, store)
    kept = pipe.store.open("self_instruct", pipe.fingerprints()["self_instruct"]).records("data/*.jsonl")
    assert sorted(r["instruction"] for r in kept) == sorted(t[0] for t in TASKS)  # every task reached translate
    return store


@pytest.fixture(scope="module")
def clean(server, english, tmp_path_factory):
    """translate on a healthy server: (store, records by pattern, number of translation requests)."""
    store = tmp_path_factory.mktemp("api-replies") / "clean"
    shutil.copytree(english, store)
    mp = pytest.MonkeyPatch()
    mp.setenv("POLYALIGN_TEST_KEY", CANARY)
    start = len(server.log)
    try:
        code, _, err = run_cli(_args(server, "stage translate", store))
    finally:
        mp.undo()
    assert code == 0, err[-3000:]
    asked = {e["key"] for e in server.log[start:] if str(e.get("key")).startswith("fr/")}
    return store, _records(server, store), len(asked)


@pytest.fixture()
def key(monkeypatch):
    monkeypatch.setenv("POLYALIGN_TEST_KEY", CANARY)


TRANSPORT = {  # the fault: what the one line gives as the cause
    "429": "http_429", "500": "http_500", "503": "http_503", "slow": "timeout", "drop": "connection",
    "malformed": "malformed", "empty": "empty_choices", "no_text": "malformed: choice has no text",
    "html": "malformed: reply is not a completion object",
}


def _one_faulty_run(server: ModelServer, english: Path, store: Path, fault: str) -> tuple[list[dict], str]:
    """translate into a copy of the English store while every request for the record about
    volcanic soils gets `fault`: (the server's log of the run, the one `error:` line); the
    stage must have stopped with exit 2, no traceback, the key unseen, nothing committed."""
    shutil.copytree(english, store)
    server.faults.pick = lambda k, body: fault if "volcanic" in _source(body) else None
    start = len(server.log)
    try:
        code, _, err = run_cli(_args(server, "stage translate", store))
    finally:
        server.faults.pick = None
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("error: models.teacher: ") and CANARY not in err, lines[0]
    pipe = _pipe(server, store)
    assert pipe.store.state("translate", pipe.fingerprints()["translate"]) != "cached"
    return server.log[start:], lines[0]


@pytest.mark.parametrize("kind", list(TRANSPORT))
def test_a_request_that_keeps_failing_stops_the_stage_with_one_line_and_the_rerun_asks_only_for_it(server, english, clean, key, tmp_path, kind):
    store = tmp_path / "store"
    log, line = _one_faulty_run(server, english, store, kind)
    failed = {e["key"] for e in log if e["outcome"] == kind}
    assert len(failed) == 1, failed  # the instruction of one record, tried twice
    assert sum(e["outcome"] == kind for e in log) == 2  # the first try and one retry
    assert f"models.teacher: 1 of {clean[2]} requests failed after 1 retries" in line, line
    assert f"(last: {next(iter(failed))}: {TRANSPORT[kind]}" in line, line
    assert "run again to ask only for the rest" in line

    start = len(server.log)
    code, _, err = run_cli(_args(server, "stage translate", store))  # the server is healthy again
    assert code == 0, err[-3000:]
    asked = {e["key"] for e in server.log[start:] if str(e.get("key")).startswith("fr/")}
    assert asked == failed  # every reply that had arrived was kept
    assert _records(server, store) == clean[1]


@pytest.mark.parametrize("status, says", [
    ("400", "HTTP 400"),
    ("401", "the server refused the API key (HTTP 401"),
    ("403", "the server refused the API key (HTTP 403"),
    ("404", "the server does not serve model 'tiny-teacher'"),
])
def test_a_refusal_stops_the_stage_at_once_with_one_line(server, english, clean, key, tmp_path, status, says):
    store = tmp_path / "store"
    log, line = _one_faulty_run(server, english, store, status)
    assert sum(e["outcome"] == status for e in log) == 1  # never retried
    assert says in line, line
    code, _, err = run_cli(_args(server, "stage translate", store))
    assert code == 0, err[-3000:]
    assert _records(server, store) == clean[1]


@pytest.mark.parametrize("marker", list(CONTENT))
def test_a_reply_that_cannot_be_kept_quarantines_its_record_with_the_reason(server, english, clean, marker):
    records = clean[1]
    kept, quarantined = records["data/fr/*.jsonl"], records["quarantine/fr/*.jsonl"]
    pipe = _pipe(server, clean[0])
    sources = pipe.store.open("self_instruct", pipe.fingerprints()["self_instruct"]).records("data/*.jsonl")
    # kept + quarantined = input, each source once
    assert sorted(r["src_id"] for r in kept + quarantined) == sorted(r["id"] for r in sources)
    src = next(r for r in sources if marker in r["instruction"])
    rows = [q for q in quarantined if q["src_id"] == src["id"]]
    assert len(rows) == 1 and not any(r["src_id"] == src["id"] for r in kept)
    assert CONTENT[marker][1] in rows[0]["reason"], (CONTENT[marker][0], rows[0]["reason"])
    good = {r["id"] for r in sources if not any(m in r["instruction"] for m in CONTENT)}
    assert {r["src_id"] for r in kept} == good  # the clean replies were all kept


def test_through_run_the_failing_units_own_line_reaches_the_user_with_exit_2(server, english, key, tmp_path, prefect_harness):
    """In a Prefect flow the failing request is inside a fan-out unit (translate[fr]): `run`
    prints that unit's line, not the flow's summary of failed units, and exits 2."""
    store = tmp_path / "store"
    shutil.copytree(english, store)
    server.faults.pick = lambda k, body: "500" if "volcanic" in _source(body) else None
    try:
        code, out, err = run_cli(_args(server, "run", store) + ["--until", "translate"])
    finally:
        server.faults.pick = None
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err[-3000:])
    assert "models.teacher: 1 of " in lines[0] and ": http_500: " in lines[0] and "run again" in lines[0], lines[0]
    assert CANARY not in out + err
