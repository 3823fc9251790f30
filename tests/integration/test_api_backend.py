"""configs/tiny-api.yaml against a real local OpenAI-compatible server (the tiny teacher served
through transformers, tests/openai_server.py): the whole DAG over HTTP (slow tier; the default
tier runs up to preferences), faults injected into 30% of requests lose and duplicate
nothing, a kill -9 never makes the server answer twice what had arrived, a canary API key
reaches the server and nothing else, and bad backend settings stop the run with one line
before any stage starts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from polyalign.stages.core.model_specs import ModelSpec, TinySpec, models_dir
from polyalign.stages.core.pipeline import load_pipeline
from polyalign.stages.core.prepare import ensure_model
from tests.conftest import ROOT, cli, copy_store
from tests.integration.test_resume import _kill_when
from tests.openai_server import Faults, ModelServer

pytestmark = pytest.mark.integration
API = ROOT / "configs" / "tiny-api.yaml"
CANARY = "sk-polyalign-canary-7f3e1d"


@pytest.fixture(scope="module")
def server():
    path = ensure_model(ModelSpec(tiny=TinySpec(seed=1)), models_dir())
    srv = ModelServer(path, "tiny-teacher", Faults(rate=0.0, slow_seconds=3.0, retry_after="1", seed=7)).start()
    yield srv
    srv.stop()


@pytest.fixture()
def env(tmp_path):
    return _env(tmp_path / "prefect-home")


def _sets(server: ModelServer, *more: str) -> list[str]:
    out = ["--set", f"models.teacher.openai.base_url={server.base_url}", "--set", "models.teacher.openai.api_key_env=POLYALIGN_TEST_KEY"]
    for item in more:
        out += ["--set", item]
    return out


def _ids(art, pattern: str) -> list[str]:
    return sorted(r["id"] for r in art.records(pattern))


def _env(home: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["PREFECT_HOME"] = str(home)
    e["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    e["POLYALIGN_TEST_KEY"] = CANARY
    return e


@pytest.fixture(scope="module")
def clean(server, tmp_path_factory):
    """A run up to preferences on a healthy server (read-only: copy it before running more):
    (store, its Prefect home, the run's process)."""
    root = tmp_path_factory.mktemp("api-clean")
    store = root / "store"
    server.faults.rate = 0.0
    proc = cli("run", str(API), "--until", "preferences", "--store", str(store), *_sets(server), env=_env(root / "prefect-home"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return store, root / "prefect-home", proc


def _no_canary(places: list[Path], procs: list[subprocess.CompletedProcess]) -> None:
    for root in places:
        for f in root.rglob("*"):
            if f.is_file():
                assert CANARY.encode() not in f.read_bytes(), f
    for proc in procs:
        assert CANARY not in proc.stdout + proc.stderr


def test_faults_lose_nothing_and_the_key_stays_secret(server, clean, env, tmp_path):
    faulty = str(tmp_path / "faulty")
    server.faults.rate = 0.3
    start = len(server.log)
    second = cli("run", str(API), "--until", "preferences", "--store", faulty, *_sets(server), env=env)
    server.faults.rate = 0.0
    assert second.returncode == 0, second.stderr[-3000:]
    log = server.log[start:]
    injected = [e for e in log if e["outcome"] in ("429", "500", "503", "slow", "drop", "malformed", "empty")]
    accepted = [e for e in log if e["outcome"] not in ("replied", "client_gone", "error")]
    assert len(injected) / len(accepted) > 0.2  # the faults were really there
    assert {e["outcome"] for e in injected} >= {"429", "500", "503", "drop", "malformed", "empty"}

    pipes = {s: load_pipeline(API, _sets(server)[1::2], store=str(s), check_models=False) for s in (clean[0], faulty)}
    for stage, patterns in {
        "self_instruct": ("data/*.jsonl", "quarantine/*.jsonl"),
        "translate": ("data/*/*.jsonl", "quarantine/*/*.jsonl"),
        "preferences": ("data/*/*.jsonl", "quarantine/*/*.jsonl"),
    }.items():
        arts = {s: p.store.open(stage, p.fingerprints()[stage]) for s, p in pipes.items()}
        for pattern in patterns:
            ids = _ids(arts[faulty], pattern)
            assert ids == _ids(arts[clean[0]], pattern), (stage, pattern)
            assert len(ids) == len(set(ids)), (stage, pattern)
    tr = pipes[faulty].store.open("translate", pipes[faulty].fingerprints()["translate"])
    si = pipes[faulty].store.open("self_instruct", pipes[faulty].fingerprints()["self_instruct"])
    for lang in ("fr", "de"):  # kept + quarantined = input
        assert tr.metrics["translated"][lang] + tr.metrics["quarantined"][lang] == si.metrics["records"]
    usage = tr.metrics["usage"]["teacher"]
    assert usage["requests"] > 0 and usage["completion_tokens"] > 0 and usage["cost"] > 0

    # the canary key went to the server and nowhere else
    assert any(e.get("auth") == f"Bearer {CANARY}" for e in log)
    _no_canary([clean[0], clean[1], Path(faulty), Path(env["PREFECT_HOME"])], [clean[2], second])


@pytest.mark.slow
def test_whole_dag_over_http_then_every_stage_is_cached(server, clean, env, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(clean[0], store)
    server.faults.rate = 0.0
    first = cli("run", str(API), "--store", str(store), *_sets(server), env=env)  # the stages after preferences
    assert first.returncode == 0, first.stderr[-3000:]
    whole = load_pipeline(API, _sets(server)[1::2], store=str(store), check_models=False)
    ev = whole.store.open("evaluate", whole.fingerprints()["evaluate"])
    for lang in ("fr", "de"):  # evaluate's judge (the teacher) rated through the server
        models = ev.read_json(f"results/{lang}.json")["responses"]["models"]
        assert all(1 <= models[v]["judge_rating"] <= 5 for v in ("base", "sft", "aligned")), models
    again = cli("run", str(API), "--store", str(store), *_sets(server), env=env)  # nothing left to do
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in whole.order:
        assert f"[{stage}: Cached]" in again.stdout, stage
    assert "Finished in state Cached" in again.stderr + again.stdout
    _no_canary([store, Path(env["PREFECT_HOME"])], [first, again])


def test_kill_mid_translate_never_asks_again_for_a_reply_it_has(server, env, tmp_path):
    store = str(tmp_path / "store")
    sets = _sets(server, "translate.shard_size=64")  # one shard per language: the kill lands inside it
    assert cli("stage", "self_instruct", str(API), "--store", store, *sets, env=env).returncode == 0
    pipe = load_pipeline(API, sets[1::2], store=store, check_models=False)
    journal = pipe.store.partial_dir("translate", pipe.fingerprints()["translate"]) / "journal" / "translate" / "fr" / "00000.jsonl"

    def lines() -> int:
        try:
            return journal.read_bytes().count(b"\n")
        except OSError:
            return 0

    server.faults.rate = 0.3
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "polyalign", "stage", "translate", str(API), "--store", store, *sets],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        _kill_when(proc, lambda: lines() >= 10)
        import json

        arrived = {json.loads(line)["key"] for line in journal.read_bytes().splitlines() if line.strip().endswith(b"}")}
        assert len(arrived) >= 10
        start = len(server.log)
        rerun = cli("stage", "translate", str(API), "--store", store, *sets, env=env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    finally:
        server.faults.rate = 0.0
    asked_again = {e["key"] for e in server.log[start:]} & arrived
    assert not asked_again
    art = pipe.store.open("translate", pipe.fingerprints()["translate"])
    assert not art.listed("journal/*")  # work files do not reach the artifact


@pytest.mark.parametrize(
    "override, expected",
    [
        ("models.teacher.backend=ollama", "models.teacher.backend"),
        ("models.teacher.openai.base_url=null", "models.teacher.openai.base_url"),
        ("models.teacher.openai.api_key_env=POLYALIGN_NO_SUCH_KEY", "models.teacher.openai.api_key_env: environment variable POLYALIGN_NO_SUCH_KEY is not set"),
        ("models.teacher.openai.base_url=http://127.0.0.1:9/v1", "models.teacher: cannot reach http://127.0.0.1:9/v1"),
        ("models.teacher.openai.model=no-such-model", "models.teacher.openai.model: "),
    ],
)
def test_bad_backend_settings_stop_before_any_stage(server, env, tmp_path, override, expected):
    store = tmp_path / "store"
    proc = cli("run", str(API), "--store", str(store), *_sets(server), "--set", override, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(p.name == "manifest.json" for p in store.rglob("*")) if store.exists() else True


def _hosted_judge(key: str, body: dict, chat: bool) -> str | None:
    """Stands in for a hosted model, which the tiny random teacher cannot imitate:
    - translating into English (judge_in_english), it returns the text upper-cased with a
      tail whose length depends on the response's index, so English lengths order the
      responses differently from the originals;
    - ranking, it orders the shown responses by length (longest first, equal lengths tied).
      For a quarter of the prompts it never answers with a ranking; for another quarter only
      its first answer is unusable.
    Everything else goes to the tiny model."""
    import re
    import zlib

    if not chat:
        return None
    text = body["messages"][-1]["content"]
    if "/english/" in key:
        which = key.rsplit("/english/", 1)[1]
        original = text.split("\n\n", 1)[1]
        tail = 0 if which == "prompt" else 7 * int(which) % 5
        return original.upper() + (" " + "!" * tail if tail else "")
    if "/ranking/" not in key:
        return None
    prompt_id, attempt = key.rsplit("/ranking/", 1)
    kind = zlib.crc32(prompt_id.encode()) % 4
    if kind == 0 or (kind == 1 and attempt == "0"):
        return "I cannot decide."
    shown = re.split(r"\n\n\[([A-Z])\]\n", "\n\n" + text.split("\n\nOrder the responses")[0].split("\n\n", 2)[2])[1:]
    blocks = dict(zip(shown[0::2], shown[1::2]))
    lengths = sorted({len(t) for t in blocks.values()}, reverse=True)
    return "Ranking: " + " > ".join(" = ".join(k for k, t in blocks.items() if len(t) == n) for n in lengths)


def test_ranking_judge_through_english_maps_rankings_back_and_quarantines_what_never_parses(server, clean, env, tmp_path):
    """Okapi's judge over an API: responses are translated into English, shown in a seeded
    shuffled order, and the reply's ranking is mapped back to the responses; an unparseable
    reply is asked again, then the prompt is quarantined with the reply."""
    import zlib

    store = str(tmp_path / "store")
    copy_store(clean[0], Path(store), ("self_instruct", "translate", "sft"))  # only preferences differs
    sets = _sets(server, "stages.preferences.judge_method=ranking", "stages.preferences.judge_in_english=true")
    server.script = _hosted_judge
    start = len(server.log)
    try:
        proc = cli("stage", "preferences", str(API), "--store", store, *sets, env=env)
    finally:
        server.script = None
    assert proc.returncode == 0, proc.stderr[-3000:]
    replied = {e["key"]: e["text"] for e in server.log[start:] if e["outcome"] == "replied"}
    pipe = load_pipeline(API, sets[1::2], store=store, check_models=False)
    art = pipe.store.open("preferences", pipe.fingerprints()["preferences"])
    pairs, quarantined = art.records("data/*/*.jsonl"), art.records("quarantine/*/*.jsonl")
    assert pairs and quarantined

    def by_length(texts: list[str]) -> list[list[int]]:
        return [[j for j, t in enumerate(texts) if len(t) == n] for n in sorted({len(t) for t in texts}, reverse=True)]

    differs = 0
    for rec in pairs + [q for q in quarantined if "ranking" in q]:
        pid = rec["prompt_id"]
        assert zlib.crc32(pid.encode()) % 4 != 0
        english = [replied[f"{pid}/english/{j}"].strip() for j in range(len(rec["responses"]))]
        assert [sorted(tier) for tier in rec["ranking"]] == by_length(english), pid  # the English, mapped back
        differs += by_length(rec["responses"]) != by_length(english)
        if rec in pairs:
            assert len(english[rec["responses"].index(rec["chosen"])]) > len(english[rec["responses"].index(rec["rejected"])])
    assert differs  # English lengths ordered some responses unlike the originals
    never = [q for q in quarantined if "ranking" not in q]
    assert never and all(q["reason"] == "unparseable ranking after 3 tries" and q["judge_reply"] == "I cannot decide." for q in never)
    assert {q["prompt_id"] for q in never} == {
        k.rsplit("/ranking/", 1)[0] for k in replied if k.endswith("/ranking/0") and zlib.crc32(k.rsplit("/ranking/", 1)[0].encode()) % 4 == 0
    }
    retried_then_parsed = {k.rsplit("/ranking/", 1)[0] for k in replied if k.endswith("/ranking/1")} - {q["prompt_id"] for q in never}
    assert retried_then_parsed and retried_then_parsed <= {r["prompt_id"] for r in pairs + quarantined if "ranking" in r}
    judged = art.metrics["judge"]
    for lang in ("fr", "de"):
        n_lang = sum(r["lang"] == lang for r in pairs + quarantined)
        assert sum(judged[lang].values()) == n_lang
        assert judged[lang]["unparseable"] == sum(q["lang"] == lang for q in never)
    assert art.metrics["judge_method"] == "ranking"


VERBS = ["Describe", "Compare", "Summarize", "Invent", "Criticize", "Outline", "Predict", "Rank"]
THINGS = ["volcanic soils", "medieval guilds", "tidal energy", "chess openings", "honeybee colonies", "jazz harmony", "desert cities", "paper money"]


def _good_tasks(i: int) -> list[tuple[str, str, str]]:
    return [
        (f"{VERBS[2 * i]} {THINGS[2 * i]} for a curious child.", "<noinput>", f"About {THINGS[2 * i]}."),
        (f"{VERBS[2 * i + 1]} these notes about {THINGS[2 * i + 1]}.", f"Notes on {THINGS[2 * i + 1]}.", "A plain version."),
    ]


def _alpaca_teacher(key: str, body: dict, chat: bool) -> str | tuple[str, str] | None:
    """A hosted teacher's Alpaca lists: per request two good tasks, then one case of each
    filter, an item without output, and a last task that is good, or cut by the token budget
    in request 0."""
    if chat or "/tasks/" not in key:
        return None
    i = int(key.rsplit("/", 1)[1])
    first = int(body["prompt"].rsplit("###\n", 1)[1].split(".", 1)[0])
    items = _good_tasks(i) + [
        (f"Draw a sketch of {THINGS[i]} for tourists.", "<noinput>", "..."),
        ("Name three colours", "<noinput>", "Red, blue, green."),
        ("Summarize the following paragraph in one sentence.", "A paragraph.", "A sentence."),  # a builtin seed task
        ("Repeat the input word for word here.", "same words", "same words"),
    ]
    blocks = [f"{first + k}. Instruction: {a}\n{first + k}. Input:\n{b}\n{first + k}. Output:\n{c}" for k, (a, b, c) in enumerate(items)]
    n = first + len(items)
    blocks.append(f"{n}. Instruction: This item has lost its output section.\n{n}. Input:\n<noinput>")
    n += 1
    blocks.append(f"{n}. Instruction: {VERBS[-1 - i]} odd uses of {THINGS[-1 - i]} in history.\n{n}. Input:\n<noinput>\n{n}. Output:\nA list.")
    text = "\n###\n".join(blocks)[len(f"{first}. Instruction:"):]
    return (text[: text.rfind("Output:")], "length") if i == 0 else text


def _self_instruct_with(server, env, tmp_path, method: str, script):  # noqa: ANN001, ANN202
    """Run the self_instruct stage of tiny-api.yaml with `method`, the server answering
    through `script`, with the published filter settings; return the artifact."""
    store = str(tmp_path / "store")
    sets = _sets(server, f"self_instruct.method={method}", "self_instruct.round_size=2", "self_instruct.max_rounds=1",
                 "self_instruct.num_instructions=100", "self_instruct.min_words=4", "self_instruct.keep_truncated=false")
    server.script = script
    try:
        proc = cli("stage", "self_instruct", str(API), "--store", store, *sets, env=env)
    finally:
        server.script = None
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load_pipeline(API, sets[1::2], store=store, check_models=False)
    return pipe.store.open("self_instruct", pipe.fingerprints()["self_instruct"])


def test_alpaca_method_parses_lists_and_counts_every_drop(server, env, tmp_path):
    art = _self_instruct_with(server, env, tmp_path, "alpaca", _alpaca_teacher)
    kept = {r["instruction"]: r for r in art.records("data/*.jsonl")}
    expected = {a: (b, c) for i in (0, 1) for a, b, c in _good_tasks(i)}
    expected["Predict odd uses of desert cities in history."] = ("<noinput>", "A list.")  # request 1 only
    assert set(kept) == set(expected)
    for inst, (task_input, output) in expected.items():
        assert (kept[inst]["input"], kept[inst]["output"]) == ("" if task_input == "<noinput>" else task_input, output)
    assert art.metrics["quarantine_reasons"] == {
        "blocked word 'draw'": 2,
        "fewer than 4 words": 2,
        "ROUGE-L": 2,
        "input equals output": 2,
        "unparseable task: expected an instruction, an input and an output": 2,
        "truncated: the last task was cut by the token budget": 1,
    }
    assert art.metrics["records"] + art.metrics["quarantined"] == 2 * 8
    card = art.read_bytes("README.md").decode()
    assert "method: alpaca" in card and "blocked word 'draw'" in card


SI_TASKS = [
    "Classify the tone of the customer email as angry or calm.",  # classification
    "Describe how a sundial tells the time.",  # generation, several instances
    "Explain a tricky sum to a pupil.",  # its instances disagree: 2 + 2 is 4 and 5
    "Copy the sentence exactly as it is.",  # its only instance has input equal to output
    "Draw a cat on the page.",  # blocked word
]


def _si_teacher(key: str, body: dict, chat: bool) -> str | None:
    """A hosted teacher for the original Self-Instruct method: a list continuing the prompt's
    numbering, a yes/no classification answer, then instances label-first or input-first."""
    if chat:
        return None
    prompt = body["prompt"]
    if "/list/" in key:
        i = int(key.rsplit("/", 1)[1])
        if i:  # one list is enough; the other request repeats a seed instruction
            return " Summarize the following paragraph in one sentence."
        return " " + "\n".join(f"{9 + k}. {t}" if k else t for k, t in enumerate(SI_TASKS))
    task = prompt.rsplit("Task: ", 1)[1].split("\n", 1)[0]
    if "/classification/" in key:
        return " Yes" if task.startswith("Classify") else " No"
    if "/instances/" in key:
        if task.startswith("Classify"):
            return "Class label: angry\nInput: This is the third time I write!\n\nClass label: calm\nInput: Thanks for the quick reply."
        if task.startswith("Describe"):
            return "Output: The shadow of the gnomon falls on the hour marks as the sun moves."
        if task.startswith("Explain"):
            return "Example 1\nInput: 2 + 2\nOutput: 4\n\nExample 2\nInput: 2 + 2\nOutput: 5"
        return "Example 1\nInput: Hello there.\nOutput: Hello there."
    return None


def test_self_instruct_method_classifies_and_writes_instances(server, env, tmp_path):
    art = _self_instruct_with(server, env, tmp_path, "self_instruct", _si_teacher)
    kept = {r["instruction"]: r for r in art.records("data/*.jsonl")}
    assert set(kept) == set(SI_TASKS[:2])
    clf = kept[SI_TASKS[0]]
    assert clf["is_classification"] is True and (clf["input"], clf["output"]) == ("This is the third time I write!", "angry")
    gen = kept[SI_TASKS[1]]
    assert gen["is_classification"] is False and gen["input"] == "" and gen["output"].startswith("The shadow")
    assert art.metrics["task_kinds"] == {"classification": 1, "generation": 3, "classification_unclear": 0}
    reasons = art.metrics["quarantine_reasons"]
    assert reasons == {
        "one input with different outputs": 1,
        "no valid instance (input equals output)": 1,
        "blocked word 'draw'": 1,
        "ROUGE-L": 1,
    }


CODE = "```python\ndef add(a, b):\n\n    return a + b\n```"
TR_TASKS = [  # (instruction, input, output) written by the scripted teacher
    ("Explain what this function does, then show how to call it.", CODE, f"It adds two numbers.\n\nCall it like this:\n\n{CODE}\n\nThe result of add(2, 3) is 5."),
    ("Write a polite reply to the customer at support@example.com about order 4512.", "<noinput>", "Dear customer, your order 4512 ships on Monday; see https://shop.example.com/orders for details."),
    ("Describe a quiet morning in the mountains DROPMARKERS on 3 May.", "<noinput>", "The valley was silent at 6 am."),
    ("Summarize the story of the old lighthouse ECHO keeper.", "<noinput>", "An old keeper kept the light burning for forty years."),
    ("Give advice to a nervous speaker before LOOPING a big talk.", "<noinput>", "Breathe slowly and know your first sentence by heart."),
]


def _scripted_translation(server: ModelServer, env: dict, store: str, script, *more: str):
    """Self-Instruct (one Alpaca request) and translate into French with a scripted teacher;
    the translate artifact."""
    sets = _sets(server, "self_instruct.method=alpaca", "self_instruct.round_size=1", "self_instruct.max_rounds=1",
                 "self_instruct.num_instructions=100", "self_instruct.min_words=4", "self_instruct.heldout_fraction=0",
                 "translate.max_new_tokens=200", "languages=[fr]", "preferences.languages=[fr]",
                 "evaluate.languages=[en, fr]", *more)
    server.script = script
    try:
        proc = cli("run", str(API), "--until", "translate", "--store", store, *sets, env=env)
    finally:
        server.script = None
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load_pipeline(API, sets[1::2], store=store, check_models=False)
    return pipe.store.open("translate", pipe.fingerprints()["translate"])


def _task_list(key: str, prompt: str, tasks: list[tuple[str, str, str]]) -> str:
    """The Alpaca list of `tasks` continuing the prompt's numbering (first request only)."""
    if not key.endswith("/000"):
        return ""
    first = int(prompt.rsplit("###\n", 1)[1].split(".", 1)[0])
    blocks = [f"{first + k}. Instruction: {a}\n{first + k}. Input:\n{b}\n{first + k}. Output:\n{c}" for k, (a, b, c) in enumerate(tasks)]
    return "\n###\n".join(blocks)[len(f"{first}. Instruction:"):]


def _translating_teacher(key: str, body: dict, chat: bool) -> str | tuple[str, str] | None:
    """A hosted model that writes the tasks above (Alpaca list) and translates into French:
    as many French words as the English has, then the markers in order; or, where the source
    says so, the markers dropped, the English echoed, or a loop."""
    if chat:
        return None
    prompt = body["prompt"]
    if "/tasks/" in key:
        return _task_list(key, prompt, TR_TASKS)
    source = prompt.rsplit("English: ", 1)[1].rsplit("\nFrench:", 1)[0]
    markers = " ".join(re.findall(r"\[\[\d+\]\]", source))
    if "DROPMARKERS" in source:
        return " Voici une phrase française sans aucun des repères du texte anglais."
    if "ECHO" in source:
        return " " + source
    if "LOOPING" in source:
        return " " + "encore et " * 12
    prose = re.sub(r"\[\[\d+\]\]", " ", source).split()
    words = [FRENCH[n % len(FRENCH)] for n in range(len(prose))]
    return " " + " ".join(words) + (" " + markers if markers else "") + "."


FRENCH = "le chat dort sur la chaise pendant que nous parlons de la ville et du temps qu'il fait".split()


def test_translation_masks_spans_keeps_paragraphs_and_quarantines_by_check(server, env, tmp_path):
    store = str(tmp_path / "store")
    art = _scripted_translation(server, env, store, _translating_teacher, "translate.checks=[language, echo, length, repetition]",
                                "translate.mask=[code, url, email, placeholder, number]", "translate.min_length_ratio=null",
                                "translate.max_length_ratio=null")
    kept = {r["src_id"]: r for r in art.records("data/fr/*.jsonl")}
    quarantined = art.records("quarantine/fr/*.jsonl")
    assert len(kept) == 2 and len(quarantined) == 3, [q["reason"] for q in quarantined]
    code_row = next(r for r in kept.values() if "```" in r["output"])
    # the code block comes back verbatim, the paragraphs keep their separators
    assert code_row["input"] == CODE
    assert code_row["output"].count(CODE) == 1 and code_row["output"].count("\n\n") == CODE.count("\n\n") + 3
    mail_row = next(r for r in kept.values() if "support@example.com" in r["instruction"])
    assert "4512" in mail_row["instruction"] and "https://shop.example.com/orders" in mail_row["output"]
    reasons = {q["reason"] for q in quarantined}
    assert any("lost in translation" in r for r in reasons), reasons
    assert any("untranslated" in r or "language identified as en" in r for r in reasons), reasons
    assert any("repetition loop" in r for r in reasons), reasons
    by_reason = art.metrics["quarantine_reasons"]["fr"]
    assert sum(by_reason.values()) >= 3 and 0.5 < art.metrics["length_ratio"]["fr"] < 3
    card = art.read_bytes("README.md").decode()
    assert "fr: 2 kept, 3 quarantined" in card and "masked during translation" in card
    print("restored code block in a translated output:\n" + code_row["output"])


RT_TASKS = [  # (instruction, input, output); DRIFT: the back-translation says something else
    ("Describe the harbour at dawn in two sentences.", "<noinput>", "Boats rest on calm water while gulls wake the town."),
    ("Suggest a name for a small bakery DRIFT by the river.", "<noinput>", "The Riverside Loaf would suit a bakery near the water."),
    ("List three habits that help a student sleep well.", "<noinput>", "Keep a fixed bedtime, avoid screens late, and get morning light."),
]


def _round_trip_teacher(key: str, body: dict, chat: bool) -> str | None:
    """Writes RT_TASKS (Alpaca list); 'translates' into French by spelling each word backwards
    and back into English by spelling it forwards again, except a source with DRIFT, whose
    back-translation is another sentence."""
    if chat:
        return None
    prompt = body["prompt"]
    if "/tasks/" in key:
        return _task_list(key, prompt, RT_TASKS)
    if prompt.endswith("\nFrench:"):  # English -> French
        source = prompt.rsplit("English: ", 1)[1].rsplit("\nFrench:", 1)[0]
        return " " + " ".join(w[::-1] for w in source.split())
    source = prompt.rsplit("French: ", 1)[1].rsplit("\nEnglish:", 1)[0]  # French -> English
    if "TFIRD" in source:
        return " Quantum chromodynamics binds quarks with gluons."
    return " " + " ".join(w[::-1] for w in source.split())


def test_round_trip_chrf_quarantines_the_field_whose_back_translation_drifts(server, env, tmp_path):
    store = str(tmp_path / "store")
    art = _scripted_translation(server, env, store, _round_trip_teacher, "translate.round_trip_chrf=60", "translate.checks=[echo]")
    kept = art.records("data/fr/*.jsonl")
    quarantined = art.records("quarantine/fr/*.jsonl")
    assert len(kept) == 2 and len(quarantined) == 1
    assert "DRIFT"[::-1] in quarantined[0]["instruction"]
    assert quarantined[0]["reason"].startswith("instruction: round-trip chrF") and "below 60" in quarantined[0]["reason"]
    assert art.metrics["quarantine_reasons"]["fr"] == {"round-trip chrF N below N": 1}
    # the kept fields came back word for word (chrF 100); the drifted one scored low
    assert 70 < art.metrics["round_trip_chrf"]["fr"] < 100
    back = {e["key"] for e in server.log if e.get("outcome") == "replied" and str(e.get("key")).endswith("/back")}
    assert len(back) == 3 * 2, back  # instruction and output of each record went back into English
    card = art.read_bytes("README.md").decode()
    assert "mean round-trip chrF" in card and "fertility" in card
