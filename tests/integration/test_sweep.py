"""`polyalign sweep` on the tiny config: one Prefect flow runs every variant, the upstream
stages run once and are shared through the store, and the table (markdown, JSON, plot,
Prefect table artifact) compares the variants on scores, training and inference cost."""

from __future__ import annotations

import json

import pytest

from polyalign.stages.core.pipeline import load_pipeline
from tests.conftest import TINY, cli, copy_store

pytestmark = pytest.mark.integration

# the SFT model alone, one benchmark, two languages: the mechanics, not the numbers
FIXED = ["sft.train.max_steps=2", "evaluate.inputs={sft: sft}", "evaluate.include_base=false",
         "evaluate.languages=[fr, de]", "evaluate.benchmarks={mini_mc: {}}", "evaluate.translation=null",
         "evaluate.responses=null"]


@pytest.fixture(scope="module")
def swept(prefect_harness, tiny_translated, tmp_path_factory):
    from polyalign.flows.sweep import sweep_flow
    from polyalign.stages.core import sweep

    store = copy_store(tiny_translated, tmp_path_factory.mktemp("sweep-store"))
    out = tmp_path_factory.mktemp("sweep-out")
    variants = sweep.variants(["sft.lora.method=lora,ia3,full,prompt_tuning", *FIXED])
    labels = [sweep.label(v, ["sft.lora.method"]) for v in variants]
    paths = sweep_flow(str(TINY), variants, labels, "evaluate", store, 2, str(out), "sft", 8)
    return store, variants, paths


def test_upstream_runs_once_and_every_variant_has_its_own_sft(swept):
    store, variants, _ = swept
    pipes = [load_pipeline(TINY, v, store=store) for v in variants]
    fps = [p.fingerprints() for p in pipes]
    assert len({f["translate"] for f in fps}) == 1 and len({f["sft"] for f in fps}) == len(variants)
    root = pipes[0].store.root
    # evaluate takes the SFT model alone here: the stages it does not need did not run
    assert not any((root / stage).exists() for stage in ("preferences", "reward_model", "align"))
    assert len([d for d in (root / "translate").iterdir() if d.is_dir()]) == 1
    assert len([d for d in (root / "sft").iterdir() if d.is_dir() and not d.name.endswith(".partial")]) == len(variants)


def test_table_compares_the_variants(swept):
    _, _, paths = swept
    rows = {r["variant"]: r for r in json.loads(open(paths["json"]).read())["rows"]}
    assert list(rows) == ["method=lora", "method=ia3", "method=full", "method=prompt_tuning"]
    lora, ia3, full, prompt = (rows[k] for k in rows)
    for r in (lora, ia3, full, prompt):
        assert r["error"] is None and set(r["scores"]) == {"fr", "de"} and 0 <= r["score_mean"] <= 1
        assert r["train_wall_s"] > 0 and r["train_tokens_per_s"] > 0 and r["train_flops"] > 0 and r["peak_memory_bytes"] > 0
        assert r["gen_tok_s_base"] > 0
    assert full["trainable_params"] > lora["trainable_params"] > ia3["trainable_params"] > 0
    assert full["saved_bytes"] > lora["saved_bytes"] > ia3["saved_bytes"]
    assert lora["gen_tok_s_unmerged"] > 0 and lora["gen_tok_s_merged"] > 0
    assert full["gen_tok_s_unmerged"] is None and full["gen_tok_s_merged"] > 0
    # virtual tokens: evaluated in front of every sequence, timed unmerged only (nothing merges)
    assert prompt["trainable_params"] > 0 and prompt["gen_tok_s_unmerged"] > 0 and prompt["gen_tok_s_merged"] is None
    text = open(paths["markdown"]).read()
    assert "| method=ia3 |" in text and "gen tok/s unmerged" in text and "failed: " not in text
    assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_prefect_table_artifact(swept):
    from prefect.artifacts import Artifact

    table = Artifact.get("polyalign-tiny-sweep-table")
    assert table is not None and table.type == "table"
    rows = json.loads(table.data)
    assert [r["variant"] for r in rows] == ["method=lora", "method=ia3", "method=full", "method=prompt_tuning"]
    assert all("fr" in r for r in rows)


def test_sweep_values_split_outside_brackets_and_bad_sets_are_one_line(tmp_path):
    from polyalign.stages.core.sweep import split_values, variants

    assert split_values("a,[b, c],{d: 1, e: 2},'f,g'") == ["a", "[b, c]", "{d: 1, e: 2}", "'f,g'"]
    assert variants(["x=1,2", "y=a", "z=p,q"]) == [
        ["x=1", "y=a", "z=p"], ["x=1", "y=a", "z=q"], ["x=2", "y=a", "z=p"], ["x=2", "y=a", "z=q"]]
    proc = cli("sweep", str(TINY), "--store", str(tmp_path), "--set", "sft.lora.method=lora,")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "empty value" in proc.stderr
    proc = cli("sweep", str(TINY), "--store", str(tmp_path), "--set", "sft.lora.method=lora,bogus")
    assert proc.returncode == 2 and "sft.lora.method" in proc.stderr and "Traceback" not in proc.stderr


def test_a_variant_that_fails_is_a_row_with_its_reason(swept, tmp_path):
    """A variant whose stage stops with a user error does not stop the sweep: it is a row with
    the one-line reason, and the variant beside it is scored."""
    from polyalign.flows.sweep import sweep_flow
    from polyalign.stages.core import sweep

    store, _, _ = swept
    variants = sweep.variants(["sft.mix_weights={en: 1, fr: 1, de: 1, vi: 1},{en: 1, fr: 1, de: 2}", *FIXED])
    labels = [sweep.label(v, ["sft.mix_weights"]) for v in variants]
    paths = sweep_flow(str(TINY), variants, labels, "evaluate", store, 1, str(tmp_path), "sft", 4)
    bad, good = json.loads(open(paths["json"]).read())["rows"]
    assert "sft.mix_weights: vi has no training records" in bad["error"] and "scores" not in bad
    assert good["error"] is None and set(good["scores"]) == {"fr", "de"}
    assert "failed: sft.mix_weights: vi has no training records" in open(paths["markdown"]).read()
