"""The CUDA paths of generation and translation (run with `pytest -m gpu tests/gpu` on a
machine with a GPU; skipped elsewhere). `dtype: auto` must load bfloat16 weights on the GPU;
our decode loop must agree with `model.generate` there; backend mt must translate on the GPU;
log-likelihoods in fp32 on the GPU must match the CPU's."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def tiny_path():
    from polyalign.stages.core.model_specs import ModelSpec, TinySpec, models_dir
    from polyalign.stages.core.prepare import ensure_model

    return ensure_model(ModelSpec(tiny=TinySpec(seed=5, hidden_size=128, num_layers=4)), models_dir())


def test_dtype_auto_is_bfloat16_on_the_gpu_and_decode_matches_generate(tiny_path):
    from polyalign.stages.core.backends import Request, run
    from polyalign.stages.core.backends.transformers import TransformersBackend
    from polyalign.stages.core.loading import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(tiny_path, dtype="auto"), load_tokenizer(tiny_path)
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    prompts = ["Translate: hello", "A much longer prompt about the weather in Paris today", "x"]
    lm = TransformersBackend(model, tok, batch_size=1, progress=False)
    replies = run(lm, [Request(key=str(i), prompt=p, max_new_tokens=12) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        enc = tok(p, return_tensors="pt", add_special_tokens=False).to("cuda")
        ref = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert replies[str(i)].text == expected


def test_loglikelihood_fp32_on_the_gpu_matches_the_cpu(tiny_path):
    from polyalign.stages.core.backends.transformers import TransformersBackend
    from polyalign.stages.core.loading import load_causal_lm, load_tokenizer

    requests = [("Question: 2+2?\nAnswer:", " 4"), ("Q: colour of the sky\nA:", " blue, mostly")]
    tok = load_tokenizer(tiny_path)
    gpu = load_causal_lm(tiny_path, dtype="float32")
    cpu = load_causal_lm(tiny_path, dtype="float32").to("cpu")
    a = TransformersBackend(gpu, tok, progress=False).loglikelihood(requests)
    b = TransformersBackend(cpu, tok, progress=False).loglikelihood(requests)
    for (x, _), (y, _) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-3)


def test_mt_backend_translates_on_the_gpu(tmp_path):
    from polyalign.stages.core.backends import Request, run
    from polyalign.stages.core.backends.mt import open_mt
    from tests.tiny_seq2seq import build_nllb

    path = build_nllb(tmp_path / "nllb")
    with open_mt("mt", str(path), "auto", "en", "hi", batch_size=4) as mt:
        assert mt.model.device.type == "cuda" and mt.model.dtype == torch.bfloat16
        replies = run(mt, [Request(key=f"k{i}", prompt=f"Sentence number {i} is here.", max_new_tokens=6) for i in range(6)])
    assert len(replies) == 6 and all(0 < r.completion_tokens <= 6 for r in replies.values())


def test_a_ppo_step_runs_in_bfloat16_on_the_gpu(tiny_path, tmp_path):
    import math
    import time

    from peft import LoraConfig, get_peft_model

    from polyalign.stages.core.loading import load_causal_lm, load_tokenizer
    from polyalign.stages.core.ppo import PPOSettings, PPOTrainer

    tok = load_tokenizer(tiny_path)
    model = get_peft_model(load_causal_lm(tiny_path, dtype="auto"), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    assert model.device.type == "cuda" and model.get_base_model().dtype == torch.bfloat16
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    prompts = [f"Prompt number {i}: say something." for i in range(32)]
    reward = lambda ps, rs: [r.count("e") / max(1, len(r)) for r in rs]
    settings = PPOSettings(steps=3, rollouts=32, chunk=16, minibatch=8, ppo_epochs=2, learning_rate=1e-3, max_new_tokens=32)
    start = time.perf_counter()
    history = list(PPOTrainer(model, tok, prompts, reward, settings, tmp_path / "ppo").train())
    seconds = (time.perf_counter() - start) / 3
    print(f"PPO step on {torch.cuda.get_device_name()}: {seconds:.2f} s (32 rollouts of 32 tokens, 2 epochs), "
          f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters() if v.requires_grad)
