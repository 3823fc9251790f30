"""The benchmark layer: file checks, templates, presets, shot sampling and the evaluate config."""

from __future__ import annotations

import json
import random

import pytest

from polyalign.stages.core import benchmarks as B
from polyalign.stages.core.errors import UserError
from polyalign.stages.core.pipeline import load_pipeline
from tests.conftest import SHARED_DATA, TINY

ARC_ROW = {"id": "q1", "instruction": "Why?", "option_a": "x", "option_b": "y", "option_c": "z", "option_d": "w", "answer": "B"}


def _settings(**kw):
    values = dict(task="arc", protocol="lm-eval", source="builtin", split="test", shot_split="train", shots=0,
                  template="question_answer", preprocess=False, seed=1234)
    values.update(kw)
    return B.Settings(**values)


def _arc_files(tmp_path, n_test=6, n_train=10):
    for split, n in (("test", n_test), ("train", n_train)):
        rows = [{**ARC_ROW, "id": f"{split}{i}", "instruction": f"{split} question {i}?"} for i in range(n)]
        (tmp_path / f"fr_{split}.json").write_text(json.dumps(rows))
    return str(tmp_path / "{lang}_{split}.json")


@pytest.mark.parametrize(
    "row, message",
    [
        ({k: v for k, v in ARC_ROW.items() if k != "instruction"}, "row 2: missing field 'instruction'"),
        ({**ARC_ROW, "answer": "F"}, "row 2: field 'answer' is 'F', not one of ABCD"),
        ({**ARC_ROW, "option_b": 3}, "row 2: field 'option_b' has type int"),
        ({k: v for k, v in ARC_ROW.items() if k != "option_b"}, "row 2: missing field 'option_b'"),
    ],
)
def test_malformed_okapi_rows_are_named_by_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "fr_test.json"
    path.write_text(json.dumps([ARC_ROW, row]))
    with pytest.raises(UserError) as err:
        B.load_rows("arc", str(tmp_path / "{lang}_{split}.json"), "fr", "test")
    assert str(err.value) == f"{path}: {message}"


def test_malformed_hellaswag_and_jsonl_rows(tmp_path):
    path = tmp_path / "de_validation.jsonl"
    good = {"ind": 1, "activity_label": "Cooking", "ctx_a": "He", "ctx_b": "then", "endings": ["a", "b"], "label": "1"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": "7"}) + "\n")
    with pytest.raises(UserError, match=r"de_validation.jsonl: row 2: field 'label' 7 is out of range"):
        B.load_rows("hellaswag", str(tmp_path / "{lang}_{split}.jsonl"), "de", "validation")
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(UserError, match=r"de_validation.jsonl: row 2: invalid JSON"):
        B.load_rows("hellaswag", str(tmp_path / "{lang}_{split}.jsonl"), "de", "validation")


def test_missing_language_file_is_not_an_error_until_run(tmp_path):
    with pytest.raises(FileNotFoundError):
        B.load_rows("arc", str(tmp_path / "{lang}_{split}.json"), "ta", "test")


def test_templates_of_both_protocols():
    row = {"id": "1", "question": "Le [title] ciel ?", "options": ["bleu", "vert", "rouge", "noir"], "answer": 0}
    okapi_mmlu = B.to_doc(row, "question_choices_answer", False)
    assert okapi_mmlu.query == "Question: Le [title] ciel ?\nChoices:\nA. bleu\nB. vert\nC. rouge\nD. noir\nAnswer:"
    assert okapi_mmlu.choices == row["options"]  # Okapi scores the answer texts
    letters = B.to_doc(row, "letters", False)
    assert letters.query.endswith("D. noir\nAnswer:") and letters.choices == ["A", "B", "C", "D"]
    arc = B.to_doc(row, "question_answer", True)  # lm-eval's m_arc cleans the text
    assert arc.query == "Question: Le. ciel ?\nAnswer:"
    hs = B.normalise("hellaswag", B.Path("x"), [{"activity_label": "Cooking", "ctx_a": "He takes a pan.", "ctx_b": "then he", "endings": [" [step] fries eggs.", "sleeps."], "label": 0}])[0]
    doc = B.to_doc(hs, "hellaswag", True)
    # the harnesses strip before removing brackets, so " [step] x" keeps a leading space
    assert doc.query == "Cooking: He takes a pan. Then he" and doc.choices == [" fries eggs.", "sleeps."]
    custom = B.to_doc(row, "Q: {question}\n{options}\nA:", False)
    assert custom.query == "Q: Le [title] ciel ?\nA. bleu\nB. vert\nC. rouge\nD. noir\nA:"


def test_okapi_protocol_shuffles_then_draws_shots_from_one_generator(tmp_path):
    source = _arc_files(tmp_path)
    s = _settings(protocol="okapi", source=source, shots=3, seed=42, limit=4)
    docs, contexts, prefix = B.prepare(s, "fr")
    assert prefix is None and len(docs) == 4
    # the same sequence of calls on random.Random(42): shuffle the test docs, then k shots per doc
    test = [B.to_doc(r, "question_answer", False) for r in B.load_rows("arc", source, "fr", "test")]
    train = [B.to_doc(r, "question_answer", False) for r in B.load_rows("arc", source, "fr", "train")]
    rnd = random.Random(42)
    rnd.shuffle(test)
    assert [d.id for d in docs] == [d.id for d in test[:4]]
    for doc, ctx in zip(test[:4], contexts):
        shots = rnd.sample(train, 3)
        assert ctx == "".join(f"{x.query} {x.choices[x.gold]}\n\n" for x in shots) + doc.query


def test_fixed_shots_share_a_prefix_and_never_show_a_document_itself(tmp_path):
    source = _arc_files(tmp_path)
    s = _settings(source=source, shots=3, shot_split="test", shot_sampling="fixed")
    docs, contexts, prefix = B.prepare(s, "fr")
    assert prefix and prefix.endswith("\n\n")
    shared = [c for c in contexts if c.startswith(prefix)]
    assert len(shared) >= len(docs) - 3
    for doc, ctx in zip(docs, contexts):
        assert ctx.count(doc.query) == 1  # its own question only once: never as a shot
        assert ctx.count("\n\n") == 3


def test_too_few_shots_is_a_clear_error(tmp_path):
    source = _arc_files(tmp_path, n_train=2)
    with pytest.raises(UserError, match="fr_train.json: 2 documents cannot give 3 shots"):
        B.prepare(_settings(source=source, shots=3), "fr")


def test_settings_layer_preset_benchmark_and_language():
    from polyalign.stages.evaluate import Config, settings

    cfg = Config(
        model="base",
        languages=["fr", "de"],
        preset="okapi",
        benchmarks={"m_mmlu": {"task": "mmlu", "source": "x/{lang}_{split}.json", "split": "val", "languages": {"de": {"shots": 5, "limit": 7}}}},
    )
    fr, de = settings(cfg, "m_mmlu", "fr"), settings(cfg, "m_mmlu", "de")
    assert (fr.shots, fr.shot_split, fr.split, fr.template, fr.seed) == (25, "dev", "val", "question_choices_answer", 42)
    assert (de.shots, de.limit) == (5, 7)
    lm = Config(model="base", languages=["fr"], preset="lm-eval", benchmarks={"m": {"task": "mmlu", "source": "x/{lang}_{split}.json"}})
    s = settings(lm, "m", "fr")
    assert (s.shots, s.template, s.seed) == (0, "letters", 1234)


def test_unknown_template_and_keys_are_config_errors():
    from pydantic import ValidationError

    from polyalign.stages.evaluate import Config

    with pytest.raises(ValidationError, match="template 'qa' is neither"):
        Config(model="base", languages=["fr"], benchmarks={"m": {"template": "qa"}})
    with pytest.raises(ValidationError, match="task 'mmlu' needs a file template"):
        Config(model="base", languages=["fr"], benchmarks={"m": {"task": "mmlu"}})
    with pytest.raises(ValidationError, match="shotz"):
        Config(model="base", languages=["fr"], benchmarks={"m": {"shotz": 3}})


def test_benchmark_file_content_enters_the_fingerprint(tmp_path):
    source = _arc_files(tmp_path)
    over = ["evaluate.benchmarks.arc.task=arc", f"evaluate.benchmarks.arc.source={source}", "evaluate.benchmarks.arc.shots=2"]
    before = load_pipeline(TINY, over).fingerprints()
    path = tmp_path / "fr_test.json"
    path.write_text(path.read_text().replace("test question 0", "test question zero"))
    after = load_pipeline(TINY, over).fingerprints()
    assert before["evaluate"] != after["evaluate"] and before["sft"] == after["sft"]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_shared_okapi_files_load_with_both_presets():
    source = str(SHARED_DATA / "okapi_eval" / "m_arc" / "{lang}_{split}.json")
    for protocol in ("okapi", "lm-eval"):
        s = B.Settings(task="arc", protocol=protocol, source=source, **{**B.PRESETS[protocol]["arc"], "shots": 25}, seed=1, limit=3)
        docs, contexts, _ = B.prepare(s, "vi")
        assert len(docs) == 3 and all(c.count("\nAnswer:") == 26 for c in contexts)


def test_okapi_mmlu_draws_k_plus_one_whatever_the_shot_split_is_called(tmp_path):
    source = _arc_files(tmp_path)  # the same rows serve as MMLU rows (same format)
    s = _settings(task="mmlu", protocol="okapi", source=source, shots=3, seed=42, limit=3, template="question_choices_answer")
    docs, contexts, _ = B.prepare(s, "fr")
    test = [B.to_doc(r, s.template, False) for r in B.load_rows("mmlu", source, "fr", "test")]
    train = [B.to_doc(r, s.template, False) for r in B.load_rows("mmlu", source, "fr", "train")]
    rnd = random.Random(42)
    rnd.shuffle(test)
    for doc, ctx in zip(test[:3], contexts):
        shots = [x for x in rnd.sample(train, 4) if x != doc][:3]
        assert ctx == "".join(f"{B.shot_text(x)}\n\n" for x in shots) + doc.query


@pytest.mark.parametrize("source", ["{lang}_{split", "{lang!r}_{split}.json", "{lang.upper}_{split}.json", "{language}.json"])
def test_bad_source_templates_are_one_line_errors(source):
    with pytest.raises(UserError, match=r"only \{lang\}, \{split\} may appear in braces"):
        B.resolve_file(source, "fr", "test")


def test_empty_and_undecodable_files_are_named(tmp_path):
    (tmp_path / "fr_test.json").write_text("[]")
    with pytest.raises(UserError, match=r"fr_test.json: no rows"):
        B.load_rows("arc", str(tmp_path / "{lang}_{split}.json"), "fr", "test")
    (tmp_path / "de_test.json").write_bytes(b"\xff\xfe[")
    with pytest.raises(UserError, match=r"de_test.json: not UTF-8 text"):
        B.load_rows("arc", str(tmp_path / "{lang}_{split}.json"), "de", "test")


def test_config_checks_per_language_overrides_prompts_and_shot_pools(tmp_path):
    from pydantic import ValidationError

    from polyalign.stages.evaluate import Config

    with pytest.raises(ValidationError, match="template 'qa' is neither"):
        Config(model="base", languages=["fr"], benchmarks={"m": {"languages": {"fr": {"template": "qa"}}}})
    with pytest.raises(ValidationError, match="benchmarks.m.languages: ta not among the evaluated languages"):
        Config(model="base", languages=["fr"], benchmarks={"m": {"languages": {"ta": {"shots": 1}}}})
    with pytest.raises(ValidationError, match="responses.prompts: file '/nowhere.jsonl' does not exist"):
        Config(model="base", languages=["fr"], responses={"prompts": "/nowhere.jsonl"})
    with pytest.raises(ValidationError, match=r"translation: source '/x/\{split\}.txt': only \{src\}, \{lang\}"):
        Config(model="base", languages=["fr"], translation={"source": "/x/{split}.txt", "reference": "/y/{lang}.txt"})
    source = _arc_files(tmp_path, n_train=4)
    with pytest.raises(ValidationError, match="fr_train.json: 4 documents cannot give 25 shots"):
        Config(model="base", languages=["fr"], benchmarks={"m": {"task": "arc", "source": source}})


def test_a_language_without_a_file_is_reported_and_the_others_kept():
    from polyalign.stages.core.report import markdown
    from polyalign.stages.evaluate import Config, collect

    cfg = Config(model="base", languages=["fr", "ta"], benchmarks={"m": {}})
    metrics = {"n": 24, "acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25, "acc_norm_stderr": 0.09}
    per_lang = {
        "fr": {"benchmarks": {"m": {"settings": {}, "models": {"base": metrics}}}},
        "ta": {"benchmarks": {"m": {"settings": {}, "missing": "no file for ta: x/ta_test.json"}}},
    }
    results = collect(cfg, per_lang, ["base"])
    bench = results["benchmarks"]["m"]
    assert list(bench["languages"]) == ["fr"] and bench["missing"] == {"ta": "no file for ta: x/ta_test.json"}
    assert bench["macro"]["base"]["acc"] == 0.5 and bench["macro"]["base"]["languages"] == 1
    md = markdown(results)
    assert "| fr (n=24) | 0.500 ± 0.100 | 0.250 ± 0.090 |" in md and "- ta: no file for ta: x/ta_test.json" in md


def test_only_a_definite_absence_counts_as_missing(tmp_path, monkeypatch):
    """No file: missing (recorded). Cannot read it now (permission, network, Hub): the unit
    fails with one line and the next run tries again."""
    import pathlib

    source = str(tmp_path / "{lang}_{split}.json")
    with pytest.raises(FileNotFoundError):
        B.load_rows("arc", source, "fr", "test")
    (tmp_path / "de_test.json").write_text("[]")
    real_stat = pathlib.Path.stat

    def denied(self, *a, **kw):
        if self.name == "de_test.json":
            raise PermissionError(13, "Permission denied")
        return real_stat(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "stat", denied)
    with pytest.raises(B.BenchmarkUnavailable, match="de_test.json: cannot be read now .*Permission denied.*tries again"):
        B.load_rows("arc", source, "de", "test")


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)"), "unavailable"),
        (OSError("HTTP 503 from the Hub"), "unavailable"),
        (ValueError("BuilderConfig 'xx' not found. Available: ['fr', 'de']"), "missing"),
        (ValueError('Unknown split "test". Should be one of [\'validation\'].'), "missing"),
    ],
)
def test_hub_errors_split_into_missing_and_transient(monkeypatch, raised, expected):
    import datasets

    def fail(*a, **kw):
        raise raised

    monkeypatch.setattr(datasets, "load_dataset", fail)
    if expected == "missing":
        with pytest.raises(FileNotFoundError, match="hf:org/m_arc xx/test"):
            B.load_rows("arc", "hf:org/m_arc", "xx", "test")
    else:
        with pytest.raises(B.BenchmarkUnavailable, match="hf:org/m_arc xx/test: .*the next run tries again"):
            B.load_rows("arc", "hf:org/m_arc", "xx", "test")
