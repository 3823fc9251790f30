"""Bad input as a new user gives it: broken config files, overrides out of bounds or of the wrong
type, stages wired wrongly, unusable store paths, malformed data files. Each case runs the
`polyalign` command line (in this process, for speed) and asserts exit code 2, exactly one line
on stderr, no traceback, and that the line names the field or file at fault.

The cases are grouped in families; `FAMILIES` counts them (the suite's own size check)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.reliability


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `polyalign ARGS`, run in this process."""
    from polyalign.cli import main

    out, err = io.StringIO(), io.StringIO()
    old, sys.argv = sys.argv, ["polyalign", *args]
    code: int = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
    """The `error:` lines of stderr (progress bars end their lines with carriage returns)."""
    return [line for line in re.split(r"[\r\n]+", err) if line.startswith("error: ")]


@dataclass
class Case:
    family: str
    name: str
    # the command line; `tmp` is the case's own folder (files are written there first)
    args: Callable[[Path], list[str]]
    names: str  # what the one line must name (the field, option or file)
    files: dict[str, bytes | str] = field(default_factory=dict)  # written into tmp first


TINY_TEXT = TINY.read_text()


def _validate(*sets: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["validate", str(TINY), *[x for s in sets for x in ("--set", s.replace("{tmp}", str(tmp)))]]


def _config(name: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["validate", str(tmp / name)]


def _status(store: str, *sets: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["status", str(TINY), "--store", store.replace("{tmp}", str(tmp)),
                        *[x for s in sets for x in ("--set", s)]]


def _seed(row: dict | str) -> str:
    return (row if isinstance(row, str) else json.dumps(row)) + "\n"


GOOD_SEED = {"id": "s1", "instruction": "Name a colour.", "instances": [{"input": "", "output": "blue"}],
             "is_classification": False}

CASES = [
    # --- the config file itself
    Case("config file", "binary", _config("c.yaml"), "c.yaml: not UTF-8", {"c.yaml": b"\x00\xff\xfe\x01\x02garbage"}),
    Case("config file", "latin-1", _config("c.yaml"), "c.yaml: not UTF-8",
         {"c.yaml": TINY_TEXT.replace("name: tiny", "name: caf\xe9").encode("latin-1")}),
    Case("config file", "utf-16", _config("c.yaml"), "c.yaml: not UTF-8", {"c.yaml": TINY_TEXT.encode("utf-16")}),
    Case("config file", "list nested 5000 deep", _config("c.yaml"), "c.yaml: nested deeper",
         {"c.yaml": "name: x\nlanguages: " + "[" * 5000 + "]" * 5000 + "\n"}),
    Case("config file", "mapping nested 40 deep", _config("c.yaml"), "nested more than 32 levels deep at description.a.a",
         {"c.yaml": TINY_TEXT + "description: " + "{a: " * 39 + "{}" + "}" * 39 + "\n"}),
    Case("config file", "duplicate top-level key", _config("c.yaml"), "duplicate key 'name'",
         {"c.yaml": TINY_TEXT + "name: other\n"}),
    Case("config file", "duplicate stage", _config("c.yaml"), "duplicate key 'sft'",
         {"c.yaml": TINY_TEXT + "  sft:\n    inputs: {data: translate}\n    model: base\n"}),
    Case("config file", "duplicate nested key", _config("c.yaml"), "duplicate key 'max_steps'",
         {"c.yaml": TINY_TEXT.replace("train: {max_steps: 8,", "train: {max_steps: 8, max_steps: 9,")}),
    Case("config file", "empty", _config("c.yaml"), "c.yaml: expected a mapping", {"c.yaml": ""}),
    Case("config file", "a list", _config("c.yaml"), "c.yaml: expected a mapping", {"c.yaml": "- a\n- b\n"}),
    Case("config file", "a scalar", _config("c.yaml"), "c.yaml: expected a mapping", {"c.yaml": "42\n"}),
    Case("config file", "no stages", _config("c.yaml"), "stages: no stages",
         {"c.yaml": "name: x\nmodels: {base: {tiny: {seed: 1}}}\nstages: {}\n"}),
    Case("config file", "stages missing", _config("c.yaml"), "stages",
         {"c.yaml": "name: x\nmodels: {base: {tiny: {seed: 1}}}\n"}),
    Case("config file", "bad indentation", _config("c.yaml"), "c.yaml: line", {"c.yaml": "name: x\n  stages: [\n"}),
    Case("config file", "tab indentation", _config("c.yaml"), "c.yaml: line", {"c.yaml": "name: x\nstages:\n\tsft: {}\n"}),
    Case("config file", "unknown top-level key", _config("c.yaml"), "nosuch",
         {"c.yaml": TINY_TEXT + "nosuch: 1\n"}),
    Case("config file", "unknown stage type", _config("c.yaml"), "stages.finetune",
         {"c.yaml": TINY_TEXT + "  finetune:\n    inputs: {data: translate}\n"}),
    Case("config file", "missing file", lambda tmp: ["validate", str(tmp / "absent.yaml")], "absent.yaml"),
    Case("config file", "a folder", lambda tmp: ["validate", str(tmp)], "config file not found"),
    # --- numbers and types out of bounds
    Case("bounds", "max_steps 0", _validate("sft.train.max_steps=0"), "stages.sft.train.max_steps"),
    Case("bounds", "max_steps -7", _validate("sft.train.max_steps=-7"), "stages.sft.train.max_steps"),
    Case("bounds", "learning_rate 1e99", _validate("sft.train.learning_rate=1e99"), "stages.sft.train.learning_rate"),
    Case("bounds", "learning_rate .inf", _validate("sft.train.learning_rate=.inf"), "stages.sft.train.learning_rate"),
    Case("bounds", "learning_rate .nan", _validate("sft.train.learning_rate=.nan"), "stages.sft.train.learning_rate"),
    Case("bounds", "learning_rate 0", _validate("align.train.learning_rate=0"), "stages.align.train.learning_rate"),
    Case("bounds", "temperature .inf", _validate("preferences.temperature=.inf"), "stages.preferences.temperature"),
    Case("bounds", "temperature 0", _validate("preferences.temperature=0"), "stages.preferences.temperature"),
    Case("bounds", "lora.r true", _validate("sft.lora.r=true"), "stages.sft.lora.r"),
    Case("bounds", "lora.r 2.5", _validate("sft.lora.r=2.5"), "stages.sft.lora.r"),
    Case("bounds", "lora.r 1e8", _validate("sft.lora.r=1e8"), "stages.sft.lora.r"),
    Case("bounds", "lora.r 10**8", _validate("sft.lora.r=100000000"), "stages.sft.lora.r"),
    Case("bounds", "lora.r 0", _validate("reward_model.lora.r=0"), "stages.reward_model.lora.r"),
    Case("bounds", "lora.alpha false", _validate("sft.lora.alpha=false"), "stages.sft.lora.alpha"),
    Case("bounds", "lr_scheduler free text", _validate("sft.train.lr_scheduler=cosine-ish"), "stages.sft.train.lr_scheduler"),
    Case("bounds", "target_modules empty", _validate("sft.lora.target_modules=[]"), "stages.sft.lora.target_modules"),
    Case("bounds", "target_modules not a name", _validate("sft.lora.target_modules=['q proj']"),
         "stages.sft.lora.target_modules"),
    Case("bounds", "batch_size 0", _validate("sft.train.batch_size=0"), "stages.sft.train.batch_size"),
    Case("bounds", "num_epochs .inf", _validate("sft.train.num_epochs=.inf"), "stages.sft.train.num_epochs"),
    Case("bounds", "warmup -1", _validate("sft.train.warmup=-1"), "stages.sft.train.warmup"),
    Case("bounds", "dropout 1.5", _validate("sft.lora.dropout=1.5"), "stages.sft.lora.dropout"),
    Case("bounds", "save_steps 0", _validate("sft.save_steps=0"), "stages.sft.save_steps"),
    Case("bounds", "retries -1", _validate("retries.units=-1"), "retries.units"),
    Case("bounds", "tiny hidden_size true", _validate("models.base={tiny: {hidden_size: true}}"), "models.base"),
    # --- the DAG: edges, languages, models
    Case("dag", "input makes a cycle", _validate("sft.inputs={data: evaluate}"), "stages.sft.inputs"),
    Case("dag", "pairs from translate", _validate("reward_model.inputs={pairs: translate, policy: sft}"),
         "stages.reward_model.inputs.pairs"),
    Case("dag", "policy from translate", _validate("align.inputs={pairs: preferences, policy: translate}"),
         "stages.align.inputs.policy"),
    Case("dag", "evaluate.sft from align", _validate("evaluate.inputs={sft: align}"), "stages.evaluate.inputs.sft"),
    Case("dag", "input to no stage", _validate("sft.inputs={data: nosuch}"), "stages.sft.inputs.data"),
    Case("dag", "input that does not exist", _validate("sft.inputs={data: translate, extra: translate}"),
         "stages.sft.inputs.extra"),
    Case("dag", "sft language never translated", _validate("sft.languages=[vi]"), "stages.sft.languages"),
    Case("dag", "preferences language never translated", _validate("preferences.languages=[fr, vi]"),
         "stages.preferences.languages"),
    Case("dag", "unknown language code", _validate("sft.languages=[xx]"), "stages.sft.languages"),
    Case("dag", "unknown model", _validate("sft.model=nosuch"), "stages.sft.model"),
    Case("dag", "model path of an unknown user", _validate("models.base={path: ~nosuchuser/m}"), "models.base.path"),
    Case("dag", "model path missing", _validate("models.base={path: {tmp}/absent}"), "models.base.path"),
    Case("dag", "model folder without config.json", _validate("models.base={path: {tmp}/model}"), "models.base.path",
         {"model/tokenizer.json": "{}"}),
    # --- the --set option itself
    Case("overrides", "no =", _validate("sft.train.max_steps"), "--set 'sft.train.max_steps'"),
    Case("overrides", "unknown key", _validate("sft.train.nosuch=1"), "stages.sft.train.nosuch"),
    Case("overrides", "duplicate key in a value", _validate("sft.train={max_steps: 2, max_steps: 3}"), "--set sft.train"),
    Case("overrides", "value nested 40 deep", _validate("description=" + "[" * 40 + "]" * 40), "--set description"),
    Case("overrides", "invalid YAML value", _validate("sft.train={max_steps: [}"), "--set sft.train"),
    Case("overrides", "into a scalar", _validate("name.x=1"), "--set name.x"),
    # --- the store
    Case("store", "empty path", _status(""), "--store"),
    Case("store", "a file", _status("{tmp}/afile"), "afile: exists and is not a folder", {"afile": "x"}),
    Case("store", "under /proc", _status("/proc/polyalign-store"), "/proc/polyalign-store"),
    Case("store", "under /sys", _status("/sys/polyalign-store"), "/sys/polyalign-store"),
    Case("store", "unknown user", _status("~nosuchuser/store"), "~nosuchuser/store"),
    Case("store", "config store of an unknown user", lambda tmp: ["status", str(TINY), "--set", "store=~nosuchuser/s"],
         "~nosuchuser/s"),
    Case("store", "stage run into a file store", lambda tmp: ["stage", "self_instruct", str(TINY), "--store", str(tmp / "afile")],
         "afile: exists and is not a folder", {"afile": "x"}),
    # --- data files, read at config time
    Case("data files", "seed tasks missing", _validate("self_instruct.seed_tasks={tmp}/absent.jsonl"),
         "stages.self_instruct.seed_tasks"),
    Case("data files", "seed tasks of an unknown user", _validate("self_instruct.seed_tasks=~nosuchuser/s.jsonl"),
         "stages.self_instruct.seed_tasks"),
    Case("data files", "seed tasks not JSON", _validate("self_instruct.seed_tasks={tmp}/s.jsonl"), "s.jsonl:2: invalid JSON",
         {"s.jsonl": _seed(GOOD_SEED) + "{not json}\n"}),
    Case("data files", "seed tasks not UTF-8", _validate("self_instruct.seed_tasks={tmp}/s.jsonl"), "s.jsonl:1: not UTF-8",
         {"s.jsonl": _seed(GOOD_SEED).replace("colour", "col\xf6ur").encode("latin-1")}),
    Case("data files", "seed instruction of 5 MB", _validate("self_instruct.seed_tasks={tmp}/s.jsonl"),
         "field 'instruction' has 5,000,000 characters", {"s.jsonl": _seed({**GOOD_SEED, "instruction": "x" * 5_000_000})}),
    Case("data files", "seed instance not an object", _validate("self_instruct.seed_tasks={tmp}/s.jsonl"),
         "s.jsonl: record 1: instance 1", {"s.jsonl": _seed({**GOOD_SEED, "instances": ["blue"]})}),
    Case("data files", "seed output not text", _validate("self_instruct.seed_tasks={tmp}/s.jsonl"),
         "instance 1: field 'output'", {"s.jsonl": _seed({**GOOD_SEED, "instances": [{"input": "", "output": 3}]})}),
    Case("data files", "seed instruction empty", _validate("self_instruct.seed_tasks={tmp}/s.jsonl"),
         "field 'instruction' is empty", {"s.jsonl": _seed({**GOOD_SEED, "instruction": "  "})}),
    Case("data files", "seed file with no records", _validate("self_instruct.seed_tasks={tmp}/s.jsonl"), "s.jsonl: no records",
         {"s.jsonl": "\n\n"}),
    Case("data files", "seed row missing instances", _validate("self_instruct.seed_tasks={tmp}/s.jsonl"),
         "missing field 'instances'", {"s.jsonl": _seed({"instruction": "Name a colour."})}),
    Case("data files", "held-out prompts missing a field", _validate("evaluate.responses.prompts={tmp}/p.jsonl"),
         "stages.evaluate: responses.prompts: ", {"p.jsonl": _seed({"id": "p1", "lang": "fr"})}),
    Case("data files", "held-out prompt empty", _validate("evaluate.responses.prompts={tmp}/p.jsonl"),
         "prompt 'p1' is empty", {"p.jsonl": _seed({"id": "p1", "lang": "fr", "prompt": " "})}),
    Case("data files", "held-out prompts missing", _validate("evaluate.responses.prompts={tmp}/absent.jsonl"),
         "stages.evaluate: responses.prompts: file"),
    Case("data files", "translation test set lines differ",
         _validate("evaluate.translation={source: '{tmp}/{src}-{lang}.src', reference: '{tmp}/{src}-{lang}.ref'}"),
         "en-fr.ref: 1 lines, but", {"en-fr.src": "one\ntwo\n", "en-fr.ref": "un\n"}),
    Case("data files", "translation reference not UTF-8",
         _validate("evaluate.translation={source: '{tmp}/{src}-{lang}.src', reference: '{tmp}/{src}-{lang}.ref'}"),
         "en-de.ref: not UTF-8", {"en-de.src": "one\n", "en-de.ref": "\xfcber\n".encode("latin-1")}),
    Case("data files", "benchmark file without rows",
         _validate("evaluate.benchmarks={m_arc: {task: arc, source: '{tmp}/{lang}_{split}.json'}}"), "fr_test.json: no rows",
         {"fr_test.json": "[]"}),
]

FAMILIES = sorted({c.family for c in CASES})


def test_the_suite_covers_sixty_cases_in_six_families():
    assert len(CASES) >= 60 and len(FAMILIES) >= 6, (len(CASES), FAMILIES)
    assert len({(c.family, c.name) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}: {c.name}" for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(case, tmp_path, models_dir):
    for rel, content in case.files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    code, _, err = run_cli(case.args(tmp_path))
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-2000:]
    assert code == 2, (code, err[-1000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert case.names in lines[0], lines[0]


def test_a_benchmark_without_any_file_is_a_warning_and_the_rest_is_valid(tmp_path, models_dir):
    code, out, err = run_cli(["validate", str(TINY), "--set",
                              f"evaluate.benchmarks={{m_arc: {{task: arc, source: '{tmp_path}/{{lang}}_{{split}}.json'}}}}"])
    assert code == 0 and "valid pipeline" in out
    assert err.startswith("warning: stages.evaluate.benchmarks.m_arc.source: no file for any of its 3 languages"), err


def test_an_unexpected_exception_is_one_line_with_the_log_path(tmp_path, monkeypatch, models_dir):
    """The last resort: an exception that is not a user error (a bug) prints one line that
    names the log holding its traceback, exits 1, and keeps secrets out of both."""
    from polyalign.stages.core import pipeline

    monkeypatch.setenv("POLYALIGN_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("EXAMPLE_API_KEY", "sk-abcdefghijklmnopqrstuvwx")

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003
        raise KeyError("boom with sk-abcdefghijklmnopqrstuvwx inside")

    monkeypatch.setattr(pipeline, "load_pipeline", broken)
    code, _, err = run_cli(["validate", str(TINY)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: internal error (KeyError") and "sk-abcdef" not in err
    log = Path(lines[0].split("the traceback is in ", 1)[1].split(". ", 1)[0])
    text = log.read_text()
    assert "Traceback" in text and "broken" in text and "sk-abcdef" not in text and "<EXAMPLE_API_KEY>" in text


@pytest.mark.parametrize("stage, sets, names", [
    ("sft", ["sft.lora.target_modules=[q_proj, nosuch_proj]"], "sft.lora.target_modules: nosuch_proj names no module"),
    ("sft", ["sft.lora.placement=attention", "sft.lora.method=lora"], None),
])
def test_target_modules_the_model_lacks_stop_before_training(stage, sets, names, tiny_translated, tmp_path):
    """Module names are checked against the loaded model before the first step: one line that
    lists the linear modules the model has (the placement preset beside it trains)."""
    from tests.conftest import copy_store

    store = copy_store(tiny_translated, tmp_path / "store")
    code, _, err = run_cli(["stage", stage, str(TINY), "--store", store, "--set", "sft.train.max_steps=1", *[
        x for s in sets for x in ("--set", s)]])
    if names is None:
        assert code == 0, err[-2000:]
        return
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert names in lines[0] and "q_proj" in lines[0].split("linear modules")[1], lines[0]
