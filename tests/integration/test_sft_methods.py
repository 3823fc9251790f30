"""Every fine-tuning method of `sft.lora.method` on the tiny pipeline: it trains a few steps,
changes only what the method should change, and its artifact reloads (merged, and unmerged
with the same outputs). LISA changes exactly the layers its log names, and a LISA run killed
(-9) and resumed draws the same layers as a run never killed. Language mixing resamples to
the asked shares."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polyalign.stages.core.pipeline import load_pipeline
from tests.conftest import ROOT, TINY, cli, copy_store

pytestmark = pytest.mark.integration

ADAPTERS = ["lora", "dora", "rslora", "pissa", "adalora", "ia3", "loha", "lokr", "qlora"]
# the parameter names each method saves (PEFT's names); nothing else may be in its file
SAVED = {
    "lora": ("lora_A", "lora_B"), "rslora": ("lora_A", "lora_B"), "pissa": ("lora_A", "lora_B"),
    "qlora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "adalora": ("lora_A", "lora_B", "lora_E"), "ia3": ("ia3_l",), "loha": ("hada_w1", "hada_w2"),
    "lokr": ("lokr_w1", "lokr_w2"),
}
# LISA needs layers to choose from: a 6-layer tiny model for sft alone (translate's fingerprint
# names the base model, so the base itself is left as it is)
DEEP = ["models.deep={tiny: {seed: 3, num_layers: 6}}", "sft.model=deep"]
LAYER_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def upstream(tiny_translated, tmp_path_factory):
    """A store with self_instruct and translate done (shared by the tests)."""
    return copy_store(tiny_translated, tmp_path_factory.mktemp("sft-methods"))


def _sft(store: str, sets: list[str]):
    from polyalign.stages.core.runner import run_stage

    pipe = load_pipeline(TINY, ["sft.train.max_steps=3", *sets], store=store)
    art, _ = run_stage(pipe, "sft")
    return pipe, art


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / ("adapter_model.safetensors" if (Path(folder) / "adapter_config.json").exists() else "model.safetensors")))


def _changed(pipe, model) -> set[str]:
    """Names of the parameters of `model` that differ from the base model's."""
    from polyalign.stages.core.loading import load_causal_lm

    base = load_causal_lm(_base_path(pipe), dtype="float32")
    before = dict(base.named_parameters())
    return {n for n, p in model.named_parameters() if not bool((p.detach() == before[n].detach()).all())}


def _base_path(pipe) -> str:
    from polyalign.stages.core.runner import stage_inputs

    return stage_inputs(pipe, "sft").model(pipe.nodes["sft"].config.model)


def _ids():
    import torch

    return torch.tensor([[1, 17, 42, 99, 7, 230, 12, 5]])


@pytest.mark.parametrize("method", ADAPTERS)
def test_adapter_method_trains_only_its_modules_and_reloads(upstream, method):
    import torch
    from peft import PeftModel

    from polyalign.stages.core.loading import load_causal_lm

    pipe, art = _sft(upstream, [f"sft.lora.method={method}"])
    assert art.metrics["method"] == method and art.metrics["global_step"] == 3
    folder = art.file("model")
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = _weights(folder)
    assert weights and all(any(k in name for k in SAVED[method]) for name in weights), sorted(weights)[:4]
    if method == "pissa":  # saved as a plain LoRA of twice the rank, for the unchanged base
        assert config["init_lora_weights"] is True and config["r"] == 8
    if method == "rslora":
        assert config["use_rslora"] is True

    base_path = _base_path(pipe)
    merged = load_causal_lm(base_path, [str(folder)], dtype="float32")
    changed = _changed(pipe, merged)
    # every linear module of every decoder layer, and nothing else (embeddings, norms, head)
    assert {n.split(".")[-2] for n in changed} == LAYER_LINEAR, sorted(changed)
    assert all(n.endswith(".weight") and ".layers." in n for n in changed)

    unmerged = PeftModel.from_pretrained(load_causal_lm(base_path, dtype="float32"), str(folder)).eval()
    with torch.no_grad():
        a, b = merged(_ids()).logits, unmerged(_ids()).logits
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


def test_placement_preset_puts_adapters_on_the_mlp_only(upstream):
    pipe, art = _sft(upstream, ["sft.lora.placement=mlp"])
    from polyalign.stages.core.loading import load_causal_lm

    merged = load_causal_lm(_base_path(pipe), [str(art.file("model"))], dtype="float32")
    assert {n.split(".")[-2] for n in _changed(pipe, merged)} == {"gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_methods_train_virtual_tokens_only_and_reload(upstream, method):
    import torch
    from peft import PeftModel

    from polyalign.stages.core.errors import UserError
    from polyalign.stages.core.loading import load_causal_lm

    init = "Answer in the language of the question"
    sets = [f"sft.lora.method={method}", "sft.lora.num_virtual_tokens=6"]
    if method == "prompt_tuning":
        sets.append(f"sft.lora.init_text={init}")
    pipe, art = _sft(upstream, sets)
    folder = art.file("model")
    weights = _weights(folder)
    assert list(weights) == ["prompt_embeddings"], list(weights)  # no weight of the model itself
    base_path = _base_path(pipe)
    base = load_causal_lm(base_path, dtype="float32")
    table = weights["prompt_embeddings"]
    if method == "prompt_tuning":
        # started from the embeddings of the text's tokens (repeated to 6), then trained a little
        from polyalign.stages.core.loading import load_tokenizer

        ids = load_tokenizer(base_path)(init, add_special_tokens=False)["input_ids"]
        start = base.get_input_embeddings().weight[torch.tensor((ids * 6)[:6])].detach()
        assert table.shape == start.shape
        gap = float((table - start).abs().max())
        assert 0 < gap <= 3 * 5e-3 * 1.01, gap  # trained: Adam moves a coordinate about lr per step at most
        other = base.get_input_embeddings().weight[torch.arange(50, 56)].detach()
        assert (table - start).abs().mean() < 0.5 * (table - other).abs().mean()
    else:
        assert table.shape[0] == 6  # keys and values of 6 positions in every layer, flattened
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        with model.disable_adapter():
            plain = model(input_ids=_ids()).logits
        tuned = model(input_ids=_ids()).logits
    assert not torch.allclose(plain[:, -1], tuned[:, -1])
    with pytest.raises(UserError, match="virtual tokens, which cannot be merged"):
        load_causal_lm(base_path, [str(folder)], dtype="float32")


def _peft_loglikelihood(model, ids: list[int], n: int):
    """log p(last n tokens of ids | the rest) by the model's own forward (peft's, here)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0, -(len(ids) - 1):]  # prompt tuning: virtual rows first
    logp = torch.log_softmax(logits.float(), dim=-1)[-n:]
    return float(logp.gather(1, torch.tensor(ids[-n:])[:, None]).sum())


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_virtual_tokens_are_evaluated_as_peft_computes_them(upstream, method):
    """evaluate's scorer (its cached, shared-prefix and per-request paths) and our decode loop,
    given a prompt- or prefix-tuned SFT model, give what peft's forward and generate give;
    stages that train on the SFT model refuse it in one line."""
    import torch
    from peft import PeftModel

    from polyalign.stages.core.adapters import sft_model
    from polyalign.stages.core.backends import Request, run
    from polyalign.stages.core.backends.transformers import TransformersBackend
    from polyalign.stages.core.errors import UserError
    from polyalign.stages.core.loading import load_causal_lm, load_tokenizer, use_lm
    from polyalign.stages.core.scoring import ChoiceScorer

    sets = [f"sft.lora.method={method}", "sft.lora.num_virtual_tokens=6"]
    if method == "prompt_tuning":
        sets.append("sft.lora.init_text=Answer in the language of the question")
    pipe, art = _sft(upstream, sets)
    folder, base_path = sft_model(art, stage="evaluate", merges=False), _base_path(pipe)
    ref = PeftModel.from_pretrained(load_causal_lm(base_path, dtype="float32"), folder).eval()
    shots = "Question: what colour is the sky?\nAnswer: blue\n\n"
    contexts = [shots + "Question: 2 + 2?\nAnswer:", shots + "Question: the capital of France, please?\nAnswer:",
                "Question: a cold season?\nAnswer:"]
    choices = [[" four", " five", " twenty two"], [" Paris", " Lyon"], [" winter", " summer", " a"]]
    with use_lm(base_path, [folder], "float32") as (model, tok):
        assert model.virtual_tokens == 6
        runs = {}
        for name, scorer, prefix in [("cached", ChoiceScorer(model, tok, batch_size=2, progress=False), None),
                                     ("prefixed", ChoiceScorer(model, tok, batch_size=2, progress=False), shots),
                                     ("per_request", ChoiceScorer(model, tok, max_length=9, progress=False), None)]:
            runs[name] = (scorer, scorer.score(contexts, choices, prefix=prefix))
            assert scorer.stats[name] > 0, (name, scorer.stats)
        prompts = ["Translate to French: good morning", "x", "Write one word about the sea and the wind"]
        backend = TransformersBackend(model, tok, batch_size=3, progress=False)
        replies = run(backend, [Request(key=str(i), prompt=p, max_new_tokens=8) for i, p in enumerate(prompts)])
    for name, (scorer, scores) in runs.items():
        for ctx, conts, got in zip(contexts, choices, scores):
            for cont, value in zip(conts, got):
                ctx_ids, cont_ids = scorer.encode(ctx, cont)
                ids = (ctx_ids + cont_ids)[-(scorer.max_length + 1):]
                assert value == pytest.approx(_peft_loglikelihood(ref, ids, len(cont_ids)), abs=1e-4), (name, ctx, cont)
    with use_lm(base_path, [], "float32") as (plain, tok):  # the virtual positions change the scores
        base_scores = ChoiceScorer(plain, tok, batch_size=2, progress=False).score(contexts, choices)
    assert max(abs(a - b) for x, y in zip(base_scores, runs["cached"][1]) for a, b in zip(x, y)) > 1e-3
    ref_tok = load_tokenizer(base_path)
    for i, p in enumerate(prompts):
        # greedy through peft's forward over the whole sequence at every step (no cache, no
        # padding); peft's generate is no reference for prefix tuning: transformers 5 drops
        # the prefix it passes as `past_key_values` for the generation cache
        ids = ref_tok(p, add_special_tokens=False)["input_ids"]
        new: list[int] = []
        for _ in range(8):
            with torch.no_grad():
                token = int(ref(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == ref_tok.eos_token_id:
                break
        assert replies[str(i)].text == ref_tok.decode(new, skip_special_tokens=True).strip(), (method, p)
    for stage in ("preferences", "reward_model", "align"):
        with pytest.raises(UserError, match="virtual tokens, which cannot be merged"):
            sft_model(art, stage=stage)


def test_full_fine_tuning_changes_every_weight(upstream):
    from polyalign.stages.core.loading import load_causal_lm

    pipe, art = _sft(upstream, ["sft.lora.method=full"])
    model = load_causal_lm(str(art.file("model")), dtype="float32")
    changed = _changed(pipe, model)
    assert changed == {n for n, _ in model.named_parameters()}


def test_lisa_changes_exactly_the_layers_of_its_log(upstream):
    from polyalign.stages.core.loading import load_causal_lm

    sets = [*DEEP, "sft.lora.method=lisa", "sft.lora.lisa_layers=2",
            "sft.lora.lisa_interval=2", "sft.train.max_steps=4", "sft.train.weight_decay=0.0"]
    pipe, art = _sft(upstream, sets)
    history = art.read_json("lisa_layers.json")
    assert [h["step"] for h in history] == [0, 2] and all(len(h["layers"]) == 2 for h in history)
    drawn = {i for h in history for i in h["layers"]}
    model = load_causal_lm(str(art.file("model")), dtype="float32")
    changed = _changed(pipe, model)
    layers_changed = {int(n.split(".layers.")[1].split(".")[0]) for n in changed if ".layers." in n}
    assert layers_changed == drawn
    assert {n for n in changed if ".layers." not in n} == {n for n, _ in model.named_parameters() if ".layers." not in n}
    # the optimizer held moments for the drawn layers only: trainable at the end = outside + 2 layers
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    outside = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n)
    assert art.metrics["trainable_params"] == outside + 2 * per_layer


def test_lisa_killed_and_resumed_draws_the_layers_of_an_uninterrupted_run(upstream, tmp_path):
    sets = [*DEEP, "sft.lora.method=lisa", "sft.lora.lisa_layers=2",
            "sft.lora.lisa_interval=3", "sft.train.max_steps=21", "sft.save_steps=3", "sft.logging_steps=3"]
    flags = [x for s in sets for x in ("--set", s)]
    store, ref = str(tmp_path / "store"), str(tmp_path / "ref")
    shutil.copytree(upstream, store)
    shutil.copytree(upstream, ref)
    pipe = load_pipeline(TINY, sets, store=store)
    fp = pipe.fingerprints()["sft"]
    ckpts = pipe.store.partial_dir("sft", fp) / "checkpoints"

    def newest() -> int:
        done = [int(d.name.split("-")[1]) for d in ckpts.glob("checkpoint-*") if (d / "trainer_state.json").exists()]
        return max(done, default=0)

    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    proc = subprocess.Popen([sys.executable, "-m", "polyalign", "stage", "sft", str(TINY), "--store", store, *flags],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while newest() < 6:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint 6 in time"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert pipe.store.state("sft", fp) == "partial"
    killed_at = newest()
    assert killed_at < 21

    rerun = cli("stage", "sft", str(TINY), "--store", store, *flags, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    art = pipe.store.open("sft", fp)
    assert art.metrics["resumed_from_step"] == killed_at
    whole = cli("stage", "sft", str(TINY), "--store", ref, *flags, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = load_pipeline(TINY, sets, store=ref).store.open("sft", fp).read_json("lisa_layers.json")
    assert [h["step"] for h in expected] == list(range(0, 21, 3))
    assert art.read_json("lisa_layers.json") == expected
    # draws after the resume come from the restored RNG: not a restart of the sequence
    assert len({tuple(h["layers"]) for h in expected}) > 1


def test_languages_resampled_by_temperature_and_weights(upstream):
    _, art = _sft(upstream, ["sft.languages=[fr]", "sft.mix_weights={en: 3, fr: 1}", "sft.train.max_steps=1"])
    counts = art.metrics["examples_per_language"]
    available = art.metrics["mixing"]["available_per_language"]
    assert sum(counts.values()) == sum(available.values())
    assert counts["en"] == 3 * counts["fr"] or abs(counts["en"] - 3 * counts["fr"]) <= 3
    card = art.file("README.md").read_text()
    assert "examples trained on" in card and f"| en | {available['en']} | {counts['en']} |" in card
    from polyalign.stages.core.errors import UserError

    with pytest.raises(UserError, match="sft.mix_weights: de has no training records here"):
        _sft(upstream, ["sft.languages=[fr]", "sft.mix_weights={en: 3, fr: 1, de: 1}", "sft.train.max_steps=1"])


def test_mix_counts_move_from_proportional_to_uniform():
    from polyalign.stages.sft import mix_counts

    counts = {"en": 600, "fr": 300, "vi": 100}
    assert mix_counts(counts, None, 1.0) == counts
    flat = mix_counts(counts, None, 1e6)
    assert sum(flat.values()) == 1000 and max(flat.values()) - min(flat.values()) <= 1
    mid = mix_counts(counts, None, 2.0)
    assert counts["vi"] < mid["vi"] < flat["vi"] and sum(mid.values()) == 1000
    assert mix_counts(counts, {"en": 0, "fr": 1, "vi": 1}, 1.0) == {"en": 0, "fr": 500, "vi": 500}


def test_method_errors_are_one_line(upstream, monkeypatch):
    from polyalign.stages.core import adapters
    from polyalign.stages.core.errors import UserError

    proc = cli("validate", str(TINY), "--set", "sft.lora.init_text=hello")
    assert proc.returncode == 2 and "sft.lora" in proc.stderr and "init_text" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = cli("validate", str(TINY), "--set", "sft.lora.method=lisa", "--set", "sft.lora.placement=mlp")
    assert proc.returncode == 2 and "placement" in proc.stderr
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match="qlora needs bitsandbytes, which is not installed"):
        adapters.quantization_config()


def test_inference_cache_chains_a_non_lora_adapter_with_a_lora_one(upstream, tmp_path):
    """evaluate's shared model: an IA3 SFT adapter (merged into a model of its own) under a
    LoRA adapter computes what merging both into a fresh copy computes."""
    import torch
    from peft import LoraConfig, get_peft_model

    from polyalign.stages.core.loading import load_causal_lm, release_models, use_lm

    pipe, art = _sft(upstream, ["sft.lora.method=ia3"])
    base_path, ia3 = _base_path(pipe), str(art.file("model"))
    torch.manual_seed(0)
    lora = get_peft_model(load_causal_lm(base_path, [ia3], dtype="float32"),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(str(tmp_path / "lora"))
    chains = {"base": [], "sft": [ia3], "aligned": [ia3, str(tmp_path / "lora")]}
    try:
        seen = {}
        for name, chain in [*chains.items(), ("sft again", [ia3])]:
            with use_lm(base_path, chain, "float32") as (model, _):
                with torch.no_grad():
                    seen[name] = model(_ids()).logits
        for name, chain in chains.items():
            with torch.no_grad():
                fresh = load_causal_lm(base_path, chain, dtype="float32")(_ids()).logits
            assert torch.allclose(seen[name], fresh, atol=1e-5), name
        assert torch.equal(seen["sft"], seen["sft again"])
        assert not torch.allclose(seen["sft"], seen["aligned"]) and not torch.allclose(seen["base"], seen["sft"])
    finally:
        release_models()


def test_per_language_plugins_train_on_their_language_and_evaluate_routes_to_them(upstream):
    from safetensors.torch import load_file

    from polyalign.stages.core.errors import UserError
    from polyalign.stages.core.runner import run_stage

    common = ["sft.include_english=false", "sft.train.max_steps=2", "evaluate.inputs={sft: sft}"]
    plug = load_pipeline(TINY, [*common, "sft.per_language=true", "sft.languages=[fr, de]", "evaluate.languages=[fr, de]"],
                         store=upstream)
    art, _ = run_stage(plug, "sft")
    m = art.metrics
    assert set(m["plugins"]) == {"fr", "de"} and m["examples_per_language"] == {
        lang: m["plugins"][lang]["examples"] for lang in ("fr", "de")}
    assert m["plugin_bytes_total"] == sum(p["bytes"] for p in m["plugins"].values()) > 0
    assert m["merged_model_bytes"] > m["plugin_bytes_total"] and m["merged_models_bytes_total"] == 2 * m["merged_model_bytes"]
    assert "against" in art.manifest["summary"]
    # the fr plugin is what SFT on the fr records alone trains
    alone = load_pipeline(TINY, [*common, "sft.languages=[fr]", "evaluate.languages=[fr]"], store=upstream)
    fr_only, _ = run_stage(alone, "sft")
    a = load_file(str(art.file("model/fr") / "adapter_model.safetensors"))
    b = load_file(str(fr_only.file("model") / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    # evaluate scores fr with the fr plugin: the same log-likelihoods as with that fr-only model
    routed, _ = run_stage(plug, "evaluate")
    direct, _ = run_stage(alone, "evaluate")
    ours = {r["id"]: r["loglikelihoods"] for r in routed.records("predictions/mini_mc/fr/sft.jsonl")}
    theirs = {r["id"]: r["loglikelihoods"] for r in direct.records("predictions/mini_mc/fr/sft.jsonl")}
    base = {r["id"]: r["loglikelihoods"] for r in routed.records("predictions/mini_mc/fr/base.jsonl")}
    assert ours.keys() == theirs.keys() and ours
    assert all(abs(x - y) < 1e-4 for k in ours for x, y in zip(ours[k], theirs[k]))
    assert any(abs(x - y) > 1e-4 for k in ours for x, y in zip(ours[k], base[k]))
    # a stage that takes one SFT model for every language says so in one line
    from polyalign.stages.core.adapters import sft_model

    with pytest.raises(UserError, match="one plugin per language .* preferences takes one SFT model"):
        sft_model(art, stage="preferences")
    with pytest.raises(UserError, match="no plugin for language 'vi'"):
        sft_model(art, "vi")


def test_padding_free_batches_train_as_padded_ones_do(upstream, tmp_path):
    """The same steps with and without padding: the same first loss, then losses within
    rounding (sums over one concatenated row round differently; Adam carries that on)."""
    arts = {}
    for flag in (True, False):
        store = copy_store(Path(upstream), tmp_path / str(flag))
        _, arts[flag] = _sft(store, [f"sft.padding_free={str(flag).lower()}", "sft.train.max_steps=4"])
    assert arts[True].metrics["padding_free"] is True and arts[False].metrics["padding_free"] is False
    assert arts[True].metrics["tokens"] == arts[False].metrics["tokens"]  # tokens that are not padding
    losses = {flag: [h["loss"] for h in art.read_json("train_log.json") if "loss" in h] for flag, art in arts.items()}
    # the first step computes the same loss; rounding differences then grow a little at lr 5e-3
    assert len(losses[True]) == 4 and abs(losses[True][0] - losses[False][0]) < 1e-5, losses
    assert all(abs(x - y) < 5e-3 for x, y in zip(losses[True], losses[False])), losses

