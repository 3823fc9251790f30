import math

import pytest

from polyalign.stages.core.fingerprint import UnhashableError, canonical_json, fingerprint
from polyalign.stages.core.pipeline import load_pipeline
from tests.conftest import TINY


def test_canonical_json_is_key_order_independent():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1})
    assert fingerprint({"x": 1.0}) != fingerprint({"x": 2.0})


@pytest.mark.parametrize("value", [object(), {1: "int key"}, {"s": {1, 2}}, b"bytes"])
def test_unhashable_values_raise(value):
    with pytest.raises(UnhashableError):
        fingerprint(value)


def test_non_finite_floats_are_stable():
    assert fingerprint({"x": math.inf}) == fingerprint({"x": math.inf})


def fps(*overrides):
    return load_pipeline(TINY, list(overrides)).fingerprints()


def test_runtime_fields_do_not_change_fingerprints():
    base = fps()
    assert fps("translate.batch_size=1", "sft.save_steps=7", "evaluate.batch_size=3") == base


def test_semantic_change_invalidates_stage_and_descendants_only():
    base = fps()
    changed = fps("sft.train.learning_rate=0.001")
    same = {s for s in base if base[s] == changed[s]}
    assert same == {"self_instruct", "translate"}
    # every stage downstream of sft changed
    assert {s for s in base if base[s] != changed[s]} == {"sft", "preferences", "reward_model", "align", "evaluate"}


def test_model_identity_is_part_of_the_fingerprint():
    base = fps()
    changed = fps("models.base.tiny.seed=99")
    assert changed["self_instruct"] == base["self_instruct"]  # uses the teacher only
    assert changed["sft"] != base["sft"]


def test_renaming_a_model_entry_keeps_fingerprints(tmp_path):
    text = TINY.read_text()
    for old, new in [("teacher: {", "mentor: {"), ("teacher: teacher", "teacher: mentor"),
                     ("model: teacher", "model: mentor"), ("judge: teacher", "judge: mentor")]:
        assert old in text
        text = text.replace(old, new)
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(text)
    assert load_pipeline(renamed).fingerprints() == fps()


def test_data_file_content_is_part_of_the_fingerprint(tmp_path):
    from polyalign.stages.core.io import builtin

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(builtin("seed_tasks.jsonl").read_text())
    same = fps(f"self_instruct.seed_tasks={seeds}")
    assert same == fps()  # the same content as the shipped file: the same key
    seeds.write_text(seeds.read_text().replace("thank-you", "thank you", 1))
    edited = fps(f"self_instruct.seed_tasks={seeds}")
    assert edited["self_instruct"] != same["self_instruct"]
    assert edited["evaluate"] != same["evaluate"]  # descendants follow
