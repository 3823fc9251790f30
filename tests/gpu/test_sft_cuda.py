"""The fine-tuning methods on a CUDA device (`pytest -m gpu tests/gpu`; skipped elsewhere):
LoRA with padding-free batches, DoRA, QLoRA (a 4-bit base through bitsandbytes' CUDA
kernels), LISA and prompt tuning train the tiny pipeline's SFT in bfloat16 (`dtype: auto`);
a prompt-tuned model is scored on the GPU through its virtual key/value prefix as peft's
forward scores it."""

from __future__ import annotations

import math
import time

import pytest

from tests.conftest import copy_store
from tests.integration.test_sft_methods import _base_path
from tests.integration.test_sft_methods import _sft as sft_stage

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def upstream(tiny_translated, tmp_path_factory):
    return copy_store(tiny_translated, tmp_path_factory.mktemp("sft-cuda"))


def _sft(store: str, sets: list[str]):
    return sft_stage(store, ["sft.train.max_steps=6", *sets])


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "lisa", "prompt_tuning"])
def test_method_trains_in_bfloat16_on_the_gpu(upstream, method):
    from polyalign.stages.core.loading import is_adapter, load_causal_lm, use_lm

    extra = ["sft.lora.lisa_layers=1", "sft.lora.lisa_interval=2"] if method == "lisa" else []
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe, art = _sft(upstream, [f"sft.lora.method={method}", *extra])
    seconds = time.perf_counter() - start
    m = art.metrics
    losses = [h["loss"] for h in art.read_json("train_log.json") if "loss" in h]
    print(f"\n[{torch.cuda.get_device_name()}] sft {method}: {m['global_step']} steps, {m['tokens']} tokens, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, padding_free={m['padding_free']}, {seconds:.1f} s, "
          f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    assert m["global_step"] == 6 and m["method"] == method and losses and all(math.isfinite(x) for x in losses)
    if method == "lisa":
        assert m["lisa_draws"] == 3
    folder = str(art.file("model"))
    ids = torch.tensor([[5, 17, 42, 9, 3]], device="cuda")
    if method == "prompt_tuning":
        with use_lm(_base_path(pipe), [folder], "auto") as (model, _tok):
            assert model.device.type == "cuda" and model.dtype == torch.bfloat16
            with torch.no_grad():
                logits = model(input_ids=ids).logits
    else:
        if is_adapter(folder):
            model = load_causal_lm(_base_path(pipe), [folder], dtype="auto")
        else:  # full and LISA save the whole model
            model = load_causal_lm(folder, dtype="auto")
        assert model.device.type == "cuda" and model.dtype == torch.bfloat16
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    assert bool(torch.isfinite(logits).all())


def test_prompt_tuned_scores_on_the_gpu_equal_peft_forward(upstream):
    from peft import PeftModel

    from polyalign.stages.core.loading import load_causal_lm, use_lm
    from polyalign.stages.core.scoring import ChoiceScorer

    pipe, art = _sft(upstream, ["sft.lora.method=prompt_tuning"])
    folder, base_path = str(art.file("model")), _base_path(pipe)
    shots = "Question: what colour is the sky?\nAnswer: blue\n\n"
    contexts = [shots + "Question: 2 + 2?\nAnswer:", shots + "Question: the capital of France?\nAnswer:"]
    choices = [[" four", " five", " twenty two"], [" Paris", " Lyon"]]
    ref = PeftModel.from_pretrained(load_causal_lm(base_path, dtype="float32"), folder).eval()
    with use_lm(base_path, [folder], "float32") as (model, tok):
        assert model.device.type == "cuda"
        for prefix in (None, shots):
            scorer = ChoiceScorer(model, tok, batch_size=2, progress=False)
            scores = scorer.score(contexts, choices, prefix=prefix)
            for ctx, conts, got in zip(contexts, choices, scores):
                for cont, value in zip(conts, got):
                    ctx_ids, cont_ids = scorer.encode(ctx, cont)
                    ids = ctx_ids + cont_ids
                    with torch.no_grad():
                        logits = ref(input_ids=torch.tensor([ids[:-1]], device="cuda")).logits[0, -(len(ids) - 1):]
                    logp = torch.log_softmax(logits.float(), dim=-1)[-len(cont_ids):]
                    expected = float(logp.gather(1, torch.tensor(cont_ids, device="cuda")[:, None]).sum())
                    assert value == pytest.approx(expected, abs=2e-3), (prefix is not None, ctx, cont)
