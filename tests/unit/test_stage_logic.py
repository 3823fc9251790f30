"""Filters, parsers and loaders of the stages, on small inputs."""

import json

import pytest

from polyalign.stages import evaluate, self_instruct, translate
from polyalign.stages.core.errors import UserError
from tests.conftest import SHARED_DATA


def si_cfg(**kw):
    return self_instruct.Config(teacher="t", **kw)


def test_instance_parsing():
    assert self_instruct._parse_instance(" <noinput>\nOutput: Paris.", "input_output") == ("", "Paris.")
    assert self_instruct._parse_instance(" 3 + 4\nOutput: 7", "input_output") == ("3 + 4", "7")
    assert self_instruct._parse_instance("no marker here", "input_output") is None
    assert self_instruct._parse_instance(" just text ", "output_only") == ("", "just text")


def test_builtin_seed_tasks_are_diverse_and_valid():
    seeds = self_instruct.load_seed_tasks("builtin")
    assert len(seeds) >= 40
    assert len({s["instruction"] for s in seeds}) == len(seeds)
    assert sum(bool(s.get("is_classification")) for s in seeds) >= 5
    assert all(s["instances"] and s["instances"][0]["output"].strip() for s in seeds)


def test_bad_seed_file_is_named(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text(json.dumps({"instruction": "ok", "instances": []}) + "\n{broken\n")
    with pytest.raises(UserError, match=r"seeds.jsonl:2: invalid JSON"):
        self_instruct.load_seed_tasks(str(bad))
    bad.write_text(json.dumps({"instances": []}) + "\n")
    with pytest.raises(UserError, match=r"seeds.jsonl:1: missing field 'instruction'"):
        self_instruct.load_seed_tasks(str(bad))


@pytest.mark.skipif(not (SHARED_DATA / "self_instruct").is_dir(), reason="../shared/data is absent")
def test_self_instruct_seed_file_from_shared_data_loads():
    seeds = self_instruct.load_seed_tasks(str(SHARED_DATA / "self_instruct" / "seed_tasks.jsonl"))
    assert len(seeds) == 175


def test_translation_checks_read_the_prose_of_a_field():
    cfg = translate.Config(model="m", languages=["fr"])
    assert translate._problems("Hello there friend", "", "fr", cfg) == ["empty translation"]
    assert translate._problems("Hello there friend", "hello there, friend!", "fr", cfg)[0].startswith("untranslated")
    assert "length ratio" in translate._problems("A fairly long English sentence here.", "Oui", "fr", cfg)[0]
    assert translate._problems("Close the window please, it is cold.", "Fermez la fenêtre, s'il vous plaît, il fait froid.", "fr", cfg) == []
    # markers (masked code) count neither in the ratio nor in the language check
    assert translate._problems("Run [[1]] now and then tell me what it prints.", "Exécutez [[1]] puis dites-moi ce qu'il affiche.", "fr", cfg) == []
    assert translate._problems("[[1]]", "[[1]]", "fr", cfg) == []  # nothing was translated: nothing to judge
    only_two = translate.Config(model="m", languages=["fr"], checks=["echo", "length"])
    assert translate._problems("Write a short story about the sea.", "Write a short story about the sea, please!", "fr", only_two) == []


def test_translate_rejects_english_target():
    with pytest.raises(ValueError, match="source language"):
        translate.Config(model="m", languages=["en", "fr"])


def test_translation_prompt_has_shots_and_language_name():
    prompt = translate._prompt("Good morning.", "vi", translate._shots("vi", 2))
    assert prompt.count("English:") == 3 and prompt.endswith("English: Good morning.\nVietnamese:")


def test_builtin_benchmark_is_parallel_across_languages():
    from polyalign.stages.core.benchmarks import builtin_path, read_rows

    rows = read_rows(builtin_path())
    by_q = {}
    for r in rows:
        by_q.setdefault(r["qid"], []).append(r)
    assert len(by_q) >= 20
    for qid, group in by_q.items():
        assert {r["lang"] for r in group} == {"en", "fr", "de", "vi", "es"}
        assert len({r["answer"] for r in group}) == 1, qid


def test_instance_parsing_keeps_only_the_first_output():
    text = " I have a dog.\nOutput: I have a cat.\nOutput: I have a cat.\nInput: x"
    assert self_instruct._parse_instance(text, "input_output") == ("I have a dog.", "I have a cat.")


def test_translate_never_promises_more_shots_than_a_language_has():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="shots: 3 built-in examples per language, but ru has 0"):
        translate.Config(model="m", languages=["fr", "ru"])
    assert translate.Config(model="m", languages=["fr", "ru"], shots=0).shots == 0
    assert translate._prompt("Hi.", "ru", translate._shots("ru", 0)).count("English:") == 1
