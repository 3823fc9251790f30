"""align with method ppo on the tiny pipeline from the command line: the adapter is trained
against the tiny reward model and loads; a run killed (-9) after a PPO checkpoint resumes at
the next step and ends with the metrics of a run never killed; bad PPO settings are one-line
errors with exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from polyalign.stages.core.pipeline import load_pipeline
from tests.conftest import ROOT, TINY, cli, copy_store

pytestmark = pytest.mark.integration

PPO = ["align.method=ppo", "align.inputs={pairs: preferences, policy: sft, reward_model: reward_model}",
       "align.ppo={steps: 4, rollouts: 8, chunk: 8, minibatch: 4, ppo_epochs: 2, learning_rate: 1.0e-3, max_new_tokens: 8}"]


def _sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


@pytest.fixture(scope="module")
def upstream(tiny_translated, tmp_path_factory):
    """A store with every stage up to reward_model done (shared by the tests)."""
    from polyalign.stages.core.loading import release_models
    from polyalign.stages.core.runner import run_stage

    store = copy_store(tiny_translated, tmp_path_factory.mktemp("ppo-store"))
    pipe = load_pipeline(TINY, store=store)
    for stage in ("sft", "preferences", "reward_model"):  # in this process: no CLI or Prefect start-up
        run_stage(pipe, stage)
    release_models()
    return store


def _artifact(store: str, extra: list[str] = ()):
    pipe = load_pipeline(TINY, [*PPO, *extra], store=store)
    return pipe.store.open("align", pipe.fingerprints()["align"])


@pytest.fixture(scope="module")
def aligned(upstream, tmp_path_factory):
    """A copy of `upstream` with align (ppo) done."""
    import shutil

    store = str(tmp_path_factory.mktemp("ppo-aligned") / "store")
    shutil.copytree(upstream, store)
    proc = cli("stage", "align", str(TINY), "--store", store, *_sets(*PPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return store


def test_ppo_trains_an_adapter_against_the_reward_model(aligned):
    art = _artifact(aligned)
    m = art.metrics
    assert m["method"] == "ppo" and m["steps"] == 4 and m["trainable_params"] > 0
    log = art.read_json("train_log.json")
    assert [h["step"] for h in log] == [1, 2, 3, 4]
    assert all(abs(h["reward_mean"]) <= 10 for h in log)  # clipped reward-model scores
    assert any(rel.startswith("tensorboard/events.out.tfevents") for rel in art.files)  # per-step curves
    e = m["efficiency"]  # the report every training stage carries
    assert e["flops"] > 0 and e["tokens_per_second"] > 0 and e["saved_model_bytes"] > 0 and e["device"] == "cpu"
    config = json.loads(art.read_bytes("model/adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["lora_dropout"] == 0.0


def test_ppo_samples_the_prompts_of_a_prompts_input_when_it_has_one(upstream, tmp_path):
    import shutil

    from polyalign.stages.core.training import user_message

    store = str(tmp_path / "store")
    shutil.copytree(upstream, store)
    extra = ["align.inputs={pairs: preferences, policy: sft, reward_model: reward_model, prompts: translate}", "align.ppo.steps=1"]
    proc = cli("stage", "align", str(TINY), "--store", store, *_sets(*PPO, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load_pipeline(TINY, [*PPO, *extra], store=store)
    translated = pipe.store.open("translate", pipe.fingerprints()["translate"])
    pairs = pipe.store.open("preferences", pipe.fingerprints()["preferences"])
    every = {user_message(r) for r in translated.iter_records("data/*/*.jsonl")}
    m = _artifact(store, extra).metrics
    assert m["prompts"] == len(every) > len({p["prompt"] for p in pairs.iter_records("data/*/*.jsonl")})
    assert "PPO on %d prompts" % len(every) in pipe.store.open("align", pipe.fingerprints()["align"]).manifest["summary"]


def test_a_killed_ppo_run_resumes_at_the_next_step_and_ends_as_an_unbroken_one(upstream, tmp_path):
    import shutil

    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    shutil.copytree(upstream, whole)
    shutil.copytree(upstream, cut)
    assert cli("stage", "align", str(TINY), "--store", whole, *_sets(*PPO)).returncode == 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "polyalign", "stage", "align", str(TINY), "--store", cut, *_sets(*PPO)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # the step is printed after its checkpoint is complete
        if "ppo step 2/4" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    time.sleep(0.5)
    again = cli("stage", "align", str(TINY), "--store", cut, *_sets(*PPO))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming PPO after step 2" in again.stdout + again.stderr
    a, b = _artifact(whole).read_json("train_log.json"), _artifact(cut).read_json("train_log.json")
    assert [h["step"] for h in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("align.inputs={pairs: preferences, policy: sft}", "stages.align.inputs: method ppo needs a reward_model input"),
        ("align.ppo.cliprange_value=0", "cliprange_value"),
        ("align.method=reinforce", "method"),
        ("align.method=grpo", "stages.align.inputs: method grpo needs a reward_model input"),
        ("align.inputs={pairs: preferences, policy: sft, prompts: translate}", "stages.align.inputs.prompts: only method ppo"),
    ],
)
def test_bad_ppo_settings_are_one_line_errors(override, expected):
    base = PPO if "grpo" not in override and "prompts" not in override else ["align.inputs={pairs: preferences, policy: sft}"]
    proc = cli("validate", str(TINY), *_sets(*base, override), timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert expected in line and "\n" not in line and "Traceback" not in line


def test_export_writes_a_model_plain_transformers_loads_and_adapters_that_rebuild_it(aligned, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, adapters = tmp_path / "merged", tmp_path / "adapters"
    proc = cli("export", str(TINY), str(merged), "--store", aligned, *_sets(*PPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli("export", str(TINY), str(adapters), "--adapters", "--store", aligned, *_sets(*PPO)).returncode == 0
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    text = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]
    card = (merged / "README.md").read_text()
    assert "polyalign" in card and "## Provenance" in card and "- fr" in card
    # the adapters, applied in order on the base model, compute what the merged export does
    base_path = json.loads((adapters / "sft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    rebuilt = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapters / "sft").merge_and_unload()
    rebuilt = PeftModel.from_pretrained(rebuilt, adapters / "align").merge_and_unload()
    import torch

    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, rebuilt(**enc).logits, atol=1e-4)
    again = cli("export", str(TINY), str(merged), "--store", aligned, *_sets(*PPO))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize("method", ["kto", "grpo", "rloo", pytest.param("dpo:ipo", marks=pytest.mark.slow), pytest.param("dpo:hinge", marks=pytest.mark.slow)])
def test_trl_methods_train_the_adapter(upstream, tmp_path, method):
    """KTO from the pairs taken unpaired; GRPO and RLOO with the reward model as reward_funcs;
    DPO's loss variants (IPO, hinge) through TRL's loss_type."""
    import shutil

    from safetensors.torch import load_file

    store = str(tmp_path / "store")
    shutil.copytree(upstream, store)
    method, _, loss = method.partition(":")
    sets = [f"align.method={method}", "align.inputs={pairs: preferences, policy: sft, reward_model: reward_model}",
            "align.online={num_generations: 2, max_new_tokens: 8}", "align.train.max_steps=2"] + ([f"align.loss_type={loss}"] if loss else [])
    proc = cli("stage", "align", str(TINY), "--store", store, *_sets(*sets))
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load_pipeline(TINY, sets, store=store)
    art = pipe.store.open("align", pipe.fingerprints()["align"])
    assert art.metrics["method"] == method and art.metrics["global_step"] == 2
    weights = load_file(str(art.file("model") / "adapter_model.safetensors"))
    # LoRA's B matrices start at zero: any that is not has been trained
    assert any(float(w.abs().max()) > 0 for k, w in weights.items() if "lora_B" in k)
    if method in ("grpo", "rloo"):
        assert any("reward" in h for h in art.read_json("train_log.json"))
    if loss:
        assert f"DPO (beta=0.1, {loss})" in art.manifest["summary"]


def test_ppo_under_torchrun_two_processes_shares_the_rollouts_and_commits_one_artifact(upstream, tmp_path):
    """Two processes (gloo on CPU) each sample half of every step's rollouts; their averaged
    gradients keep the weights identical (the trainer checks at every checkpoint); the main
    process alone writes the artifact."""
    import shutil

    from peft import PeftModel

    from polyalign.stages.core.loading import load_causal_lm
    from polyalign.stages.core.prepare import ensure_model

    store = str(tmp_path / "store")
    shutil.copytree(upstream, store)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "polyalign", "stage", "align", str(TINY),
         "--store", store, *_sets(*PPO)], cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [line for line in proc.stdout.splitlines() if line.startswith("align: done -> ")]
    assert len(done) == 2 and done[0] == done[1]
    assert proc.stdout.count("ppo step 4/4") == 1  # printed by the main process only
    art = _artifact(store)
    m = art.metrics
    assert m["processes"] == 2 and m["steps"] == 4
    log = art.read_json("train_log.json")
    assert [h["step"] for h in log] == [1, 2, 3, 4]
    # each step's figures cover both processes' rollouts: 8 responses, not 4
    assert all(h["generated_tokens"] >= 8 and h["generated_tokens"] / h["response_length"] == pytest.approx(8) for h in log)
    assert not any(rel.startswith("checkpoints/") for rel in art.files)
    pipe = load_pipeline(TINY, PPO, store=store)
    base = load_causal_lm(ensure_model(pipe.header.models["base"], pipe.models_root), dtype="float32")
    assert PeftModel.from_pretrained(base, art.file("model")) is not None


@pytest.mark.slow  # the default tier covers both options in tests/unit/test_ppo.py
def test_ppo_with_top_layers_unfrozen_and_a_separate_critic_saves_a_full_model_that_exports(upstream, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    store = str(tmp_path / "store")
    shutil.copytree(upstream, store)
    extra = ["align.ppo.num_layers_unfrozen=1", "align.ppo.critic=separate", "align.ppo.steps=2"]
    proc = cli("stage", "align", str(TINY), "--store", store, *_sets(*PPO, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training the top 1 layers" in proc.stdout + proc.stderr
    art = _artifact(store, extra)
    assert art.metrics["trained"] == "top 1 layers" and art.metrics["critic"] == "separate"
    assert "model/config.json" in art.files and "model/adapter_config.json" not in art.files
    out = tmp_path / "merged"
    assert cli("export", str(TINY), str(out), "--store", store, *_sets(*PPO, *extra)).returncode == 0
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    bad = cli("validate", str(TINY), *_sets(*PPO, "align.ppo.num_layers_unfrozen=0"), timeout=120)
    assert bad.returncode == 2 and "num_layers_unfrozen" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_reward_model_with_its_last_layers_trainable_reports_accuracy_per_language(upstream, tmp_path):
    """Okapi's reward model: the last layers and the head train (no adapter); the held-out
    accuracy is reported for each language."""
    import shutil

    import torch

    from polyalign.stages.core.loading import load_causal_lm, load_reward_model
    from polyalign.stages.core.prepare import ensure_model

    store = str(tmp_path / "store")
    shutil.copytree(upstream, store)
    sets = ["reward_model.trainable_layers=1"]
    proc = cli("stage", "reward_model", str(TINY), "--store", store, *_sets(*sets))
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load_pipeline(TINY, sets, store=store)
    art = pipe.store.open("reward_model", pipe.fingerprints()["reward_model"])
    m = art.metrics
    assert m["trained"] == "last 1 layers and the head" and "model/config.json" in art.files
    per = m["heldout_accuracy_by_language"]
    assert set(per) == {r["lang"] for r in art.iter_records("heldout_scores.jsonl")} and per
    assert sum(v["pairs"] for v in per.values()) == m["heldout_pairs"]
    assert sum(v["accuracy"] * v["pairs"] for v in per.values()) == pytest.approx(m["heldout_accuracy"] * m["heldout_pairs"])
    path = ensure_model(pipe.header.models["base"], pipe.models_root)
    sft = str(pipe.store.open("sft", pipe.fingerprints()["sft"]).file("model"))
    start = dict(load_causal_lm(path, [sft], dtype="float32", num_labels=1).named_parameters())
    trained = dict(load_reward_model(path, [sft, str(art.file("model"))], "float32").named_parameters())
    n_layers = pipe.header.models["base"].tiny.num_layers
    changed = {n for n, p in trained.items() if n in start and "score" not in n and not torch.equal(p, start[n])}
    assert changed and all(f"layers.{n_layers - 1}." in n for n in changed), sorted(changed)[:4]
