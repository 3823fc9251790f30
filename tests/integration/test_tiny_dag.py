"""The whole tiny DAG as one Prefect flow, then again from the store (every stage Cached)."""

from __future__ import annotations

import json
import time

import pytest

from polyalign.stages.core.pipeline import load_pipeline
from tests.conftest import TINY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_run(prefect_harness, tmp_path_factory):
    from polyalign.flows.pipeline import polyalign_flow

    store = str(tmp_path_factory.mktemp("store"))
    first = polyalign_flow(str(TINY), [], None, store)
    start = time.perf_counter()
    second = polyalign_flow(str(TINY), [], None, store)
    rerun_seconds = time.perf_counter() - start
    pipe = load_pipeline(TINY, store=store)
    arts = {p.name: pipe.store.open(p.name, p.fingerprint) for p in pipe.plan()}
    return first, second, rerun_seconds, pipe, arts


def test_first_run_completes_every_stage_and_rerun_is_all_cached(tiny_run):
    first, second, rerun_seconds, pipe, _ = tiny_run
    assert first == {s: "Completed" for s in pipe.order}
    assert second == {s: "Cached" for s in pipe.order}
    print(f"cached rerun inside the harness: {rerun_seconds:.1f} s")


def test_every_stage_records_metrics(tiny_run):
    *_, arts = tiny_run
    for name, art in arts.items():
        m = art.metrics
        assert m["wall_seconds"] > 0, name
        assert m["peak_rss_bytes"] > 50 * 2**20, name
        assert m["tokens"] > 0, name
        assert json.loads((art.path / "metrics.json").read_text()) == m
    for name in ("sft", "reward_model", "align"):
        assert 0 < arts[name].metrics["trainable_params"] < arts[name].metrics["total_params"]


def test_self_instruct_and_translate_account_for_every_record(tiny_run):
    *_, pipe, arts = tiny_run
    si = arts["self_instruct"]
    kept = si.records("data/*.jsonl")
    quarantined = si.records("quarantine/*.jsonl")
    assert len(kept) >= pipe.nodes["self_instruct"].config.num_instructions
    assert len({r["id"] for r in kept}) == len(kept)
    assert all(r["reason"] for r in quarantined)
    assert si.metrics["quarantined"] == len(quarantined)

    tr = arts["translate"]
    src_ids = {r["id"] for r in kept}
    for lang in ("fr", "de"):
        rows = tr.records(f"data/{lang}/*.jsonl")
        bad = tr.records(f"quarantine/{lang}/*.jsonl")
        assert {r["src_id"] for r in rows} | {r["src_id"] for r in bad} == src_ids
        assert len(rows) + len(bad) == len(src_ids)  # none dropped, none duplicated
        assert all(r["id"] == f"{r['src_id']}-{lang}" and r["lang"] == lang for r in rows)


def test_datasets_have_data_cards(tiny_run):
    *_, arts = tiny_run
    for name in ("self_instruct", "translate", "preferences"):
        card = (arts[name].path / "README.md").read_text()
        assert card.startswith("---\npretty_name:"), name
        assert "size_categories:" in card and "## Counts" in card and "## Provenance" in card
    assert "Machine-translation notice" in (arts["translate"].path / "README.md").read_text()


def _lora_b_norm(folder) -> float:
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    b = [t for k, t in weights.items() if "lora_B" in k]
    assert b, "no LoRA B matrices in the adapter"
    return float(sum(t.abs().sum() for t in b))


def test_training_stages_changed_their_adapters(tiny_run):
    *_, arts = tiny_run
    for name in ("sft", "reward_model", "align"):
        # LoRA B starts at zero: a non-zero B means the optimizer really moved it
        assert _lora_b_norm(arts[name].path / "model") > 0, name
    assert not (arts["sft"].path / "checkpoints").exists()
    assert arts["sft"].metrics["global_step"] == 8


def test_preference_pairs_are_ranked(tiny_run):
    *_, arts = tiny_run
    pairs = arts["preferences"].records("data/*/*.jsonl")
    assert pairs
    for p in pairs:
        assert p["score_chosen"] > p["score_rejected"]
        assert p["chosen"] in p["responses"] and p["rejected"] in p["responses"]
        assert len(p["responses"]) == 3
    rm = arts["reward_model"]
    held = rm.records("heldout_scores.jsonl")
    assert held, "the tiny config holds out pairs: the accuracy must be measured"
    # the headline metric is exactly the share of held-out pairs the reward model ranks right
    expected = sum(h["reward_chosen"] > h["reward_rejected"] for h in held) / len(held)
    assert rm.metrics["heldout_accuracy"] == expected
    assert rm.metrics["heldout_pairs"] == len(held)


def test_evaluation_matches_an_independent_forward_pass(tiny_run):
    import torch

    from polyalign.stages.core.benchmarks import builtin_path, read_rows
    from polyalign.stages.core.loading import load_causal_lm, load_tokenizer
    from polyalign.stages.core.prepare import ensure_model

    *_, pipe, arts = tiny_run
    ev = arts["evaluate"]
    results = ev.read_json("results.json")
    assert results["stages"] == ["base", "sft", "aligned"]
    assert set(results["benchmarks"]) == {"mini_mc", "mini_mc_3shot"}
    for bench in results["benchmarks"].values():
        assert set(bench["languages"]) == {"en", "fr", "de"} and not bench["missing"]
        assert set(bench["macro"]) == {"base", "sft", "aligned"}
    assert "### mini_mc" in ev.manifest["summary"] and "| fr (n=24) |" in ev.manifest["summary"]
    for name in ("mini_mc", "mini_mc_3shot"):
        png = ev.file(f"plots/{name}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the shared 3-shot prefix went through the prefix cache
    assert results["benchmarks"]["mini_mc_3shot"]["languages"]["fr"]["base"]["scoring"]["prefixed"] > 0
    # translation and response metrics exist for every stage
    assert set(results["translation"]["fr"]["models"]) == {"base", "sft", "aligned"}
    assert "skipped" in results["translation"]["en"]
    assert 0 <= results["responses"]["de"]["models"]["sft"]["win_rate_vs_base"] <= 1
    assert "reward_mean" in results["responses"]["de"]["models"]["aligned"]

    preds = ev.records("predictions/mini_mc/fr/base.jsonl")
    doc = next(d for d in read_rows(builtin_path()) if d["id"] == preds[0]["id"])
    path = ensure_model(pipe.header.models["base"], pipe.models_root)
    model, tok = load_causal_lm(path), load_tokenizer(path)
    ctx = f"Question: {doc['question']}\nAnswer:"
    for choice, expected in zip(doc["choices"], preds[0]["loglikelihoods"]):
        ctx_ids = tok(ctx)["input_ids"]  # the tokenizer's default special tokens, as lm-eval
        all_ids = tok(ctx + " " + choice)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([all_ids])).logits[0].float(), -1)
        ll = sum(logp[i - 1, all_ids[i]].item() for i in range(len(ctx_ids), len(all_ids)))
        assert ll == pytest.approx(expected, abs=1e-4)
    # the adapters are really applied: SFT scores differ from the base model's
    sft_preds = ev.records("predictions/mini_mc/fr/sft.jsonl")
    assert sft_preds[0]["loglikelihoods"] != preds[0]["loglikelihoods"]


def test_report_prints_the_leaderboard_from_the_store(tiny_run):
    from tests.conftest import cli

    *_, pipe, arts = tiny_run
    store = str(pipe.store.root)
    proc = cli("report", str(TINY), "--store", store, check=True)
    assert "### mini_mc_3shot" in proc.stdout and "| **macro** |" in proc.stdout and "plots:" in proc.stdout
    rows = json.loads(cli("report", str(TINY), "--store", store, "--json", check=True).stdout)
    results = arts["evaluate"].read_json("results.json")
    fr_sft = next(r for r in rows if (r["benchmark"], r["language"], r["stage"]) == ("mini_mc", "fr", "sft"))
    assert fr_sft["acc"] == round(results["benchmarks"]["mini_mc"]["languages"]["fr"]["sft"]["acc"], 4)
    # a config whose evaluation has not run yet: a one-line error, no traceback
    proc = cli("report", str(TINY), "--store", store, "--set", "evaluate.limit=3")
    assert proc.returncode == 2 and "has no results" in proc.stderr and "Traceback" not in proc.stderr


def test_prefect_artifacts_were_created(tiny_run):
    from prefect.artifacts import Artifact

    summary = Artifact.get("polyalign-tiny-summary")
    assert summary is not None and "| evaluate |" in summary.data
    table = Artifact.get("polyalign-tiny-evaluation-table")
    assert table is not None
    rows = json.loads(table.data)
    assert {r["benchmark"] for r in rows} >= {"mini_mc", "mini_mc_3shot", "translation", "responses"}
    assert {r["stage"] for r in rows} == {"base", "sft", "aligned"}
    # the long stages published their progress, ending at 100%
    for key in ("self-instruct", "translate-fr", "translate-de", "sft", "preferences", "align", "evaluate-fr"):
        progress = Artifact.get(f"polyalign-tiny-{key}-progress")
        assert progress is not None and progress.type == "progress" and float(progress.data) == 100.0, key


def test_status_predicts_what_a_config_change_reruns(tiny_run):
    from tests.conftest import cli

    *_, pipe, _ = tiny_run
    store = str(pipe.store.root)
    plain = json.loads(cli("status", str(TINY), "--store", store, "--json", check=True).stdout)
    assert {s["name"]: (s["state"], s["will_run"]) for s in plain["stages"]} == {s: ("cached", False) for s in pipe.order}
    changed = json.loads(
        cli("status", str(TINY), "--store", store, "--json", "--set", "sft.train.learning_rate=0.001", check=True).stdout
    )
    assert {s["name"] for s in changed["stages"] if s["will_run"]} == {"sft", "preferences", "reward_model", "align", "evaluate"}
    assert {s["name"] for s in changed["stages"] if s["state"] == "cached"} == {"self_instruct", "translate"}


def test_stage_with_missing_upstream_names_it(tmp_path):
    from tests.conftest import cli

    proc = cli("stage", "sft", str(TINY), "--store", str(tmp_path / "empty"))
    assert proc.returncode == 2
    assert "needs input 'data' from stage 'translate', which is missing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_two_evaluation_units_run_concurrently_like_one_after_the_other(tiny_run, tmp_path):
    """Units share the process's model (adapters switched) and each thread its tokenizer."""
    import shutil
    import threading

    from polyalign.stages.core import runner
    from polyalign.stages.core.loading import release_models

    *_, pipe, _ = tiny_run
    over = ["evaluate.limit=6", "evaluate.languages=[fr, de]", "evaluate.responses.limit=1"]
    results = {}
    for mode in ("threads", "sequential"):
        store = tmp_path / mode
        shutil.copytree(pipe.store.root, store)
        p = load_pipeline(TINY, over, store=str(store))
        release_models()
        if mode == "threads":
            errors = []

            def unit(lang, p=p, errors=errors):
                try:
                    runner.run_unit(p, "evaluate", lang)
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(f"{lang}: {exc!r}")

            threads = [threading.Thread(target=unit, args=(lang,)) for lang in ("fr", "de")]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=600)
            assert errors == []
        else:
            for lang in ("fr", "de"):
                runner.run_unit(p, "evaluate", lang)
        partial = p.store.partial_dir("evaluate", p.fingerprints()["evaluate"])
        results[mode] = {lang: json.loads((partial / "results" / f"{lang}.json").read_text()) for lang in ("fr", "de")}
    release_models()
    assert results["threads"] == results["sequential"]
    assert set(results["threads"]["fr"]["benchmarks"]["mini_mc"]["models"]) == {"base", "sft", "aligned"}
