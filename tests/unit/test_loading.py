"""One base model in memory with adapters switched on it: every variant computes exactly what
a freshly merged copy computes, in any order of switches and from concurrent threads."""

from __future__ import annotations

import threading

import pytest
import torch

from polyalign.stages.core import loading
from polyalign.stages.core.loading import load_causal_lm, thread_tokenizer, use_lm
from polyalign.stages.core.model_specs import ModelSpec, TinySpec, models_dir
from polyalign.stages.core.prepare import ensure_model


def _adapters(path: str, root, dora: tuple[bool, bool]) -> list[str]:
    """Two adapters with non-zero weights, the second made on the first merged (SFT, then DPO)."""
    from peft import LoraConfig, get_peft_model

    folders: list[str] = []
    for k, (r, targets) in enumerate([(4, "all-linear"), (2, ["q_proj", "v_proj", "down_proj"])]):
        torch.manual_seed(100 + k)
        model = load_causal_lm(path, folders)  # on top of the adapters made so far, merged
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, use_dora=dora[k], task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, cfg)
        if dora[k]:  # a trained DoRA magnitude differs from the weight norm it starts at
            for name, param in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.data.mul_(1.0 + 0.1 * torch.rand_like(param))
        folder = root / f"adapter{k}"
        peft_model.save_pretrained(str(folder))
        folders.append(str(folder))
    return folders


@pytest.fixture(scope="module", params=[(False, False), (True, True), (False, True)], ids=["lora", "dora", "lora+dora"])
def base_and_adapters(request, tmp_path_factory):
    path = ensure_model(ModelSpec(tiny=TinySpec(seed=11)), models_dir())
    return path, _adapters(path, tmp_path_factory.mktemp("adapters"), request.param)


def _logits(model, tok) -> torch.Tensor:
    enc = tok(["Translate this sentence, please.", "Bonjour"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**enc).logits.float()


def test_every_variant_equals_a_merged_copy_in_any_order(base_and_adapters):
    loading.release_models()
    path, (sft, dpo) = base_and_adapters
    tok = thread_tokenizer(path)
    # "second": the second adapter alone, on a layer set where the first one is loaded too
    chains = {"base": [], "sft": [sft], "aligned": [sft, dpo], "second": [dpo]}
    reference = {name: _logits(load_causal_lm(path, chain), tok) for name, chain in chains.items()}
    assert not torch.equal(reference["base"], reference["sft"])
    assert not torch.equal(reference["sft"], reference["aligned"])
    for name in ["sft", "aligned", "base", "second", "sft", "aligned", "second", "base", "aligned", "base"]:
        with use_lm(path, chains[name]) as (model, tok):
            assert torch.equal(_logits(model, tok), reference[name]), name
    assert len(loading._residents) == 1  # one base model for the three variants


def test_generation_matches_the_merged_copy(base_and_adapters):
    from polyalign.stages.core.backends import Request, run
    from polyalign.stages.core.backends.transformers import TransformersBackend

    def hello(model, tok):
        return run(TransformersBackend(model, tok, progress=False), [Request(key="k", prompt="Hello", max_new_tokens=12)])["k"].text

    loading.release_models()
    path, (sft, dpo) = base_and_adapters
    tok = thread_tokenizer(path)
    expected = hello(load_causal_lm(path, [sft, dpo]), tok)
    with use_lm(path, [sft]):
        pass
    with use_lm(path, [sft, dpo]) as (model, tok):
        assert hello(model, tok) == expected


def test_threads_wanting_different_variants_take_turns(base_and_adapters):
    loading.release_models()
    path, (sft, dpo) = base_and_adapters
    tok = thread_tokenizer(path)
    chains = [[], [sft], [sft, dpo]]
    reference = [_logits(load_causal_lm(path, c), tok) for c in chains]
    errors: list[str] = []

    def worker(k: int) -> None:
        for step in range(6):
            which = (k + step) % 3
            with use_lm(path, chains[which]) as (model, t):
                if not torch.equal(_logits(model, t), reference[which]):
                    errors.append(f"thread {k} step {step}: variant {which} differs")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_one_thread_holding_two_variants_is_an_error_not_a_hang(base_and_adapters):
    loading.release_models()
    path, (sft, _) = base_and_adapters
    with use_lm(path, [sft]):
        with pytest.raises(RuntimeError, match="two adapter sets"):
            with use_lm(path, []):
                pass
    with use_lm(path, []):  # released properly afterwards
        pass


def test_each_thread_has_its_own_tokenizer(base_and_adapters):
    path, _ = base_and_adapters
    mine = thread_tokenizer(path)
    assert thread_tokenizer(path) is mine
    other: list = []
    t = threading.Thread(target=lambda: other.append(thread_tokenizer(path)))
    t.start()
    t.join()
    assert other[0] is not mine


def test_models_loaded_from_two_threads_at_once_are_whole(tmp_path):
    """transformers builds models on the meta device by patching the whole process: two loads
    in two threads (an evaluation unit and preferences) must not leave meta parameters."""
    import threading

    from polyalign.stages.core.loading import load_causal_lm
    from polyalign.stages.core.model_specs import TinySpec
    from polyalign.stages.core.prepare import build_tiny

    folders = [tmp_path / f"m{s}" for s in (11, 12)]
    for seed, folder in zip((11, 12), folders):
        build_tiny(TinySpec(seed=seed, num_layers=4), folder)
    broken: list[str] = []

    def load(folder) -> None:
        for _ in range(4):
            try:
                model = load_causal_lm(str(folder), dtype="float32")
                broken.extend(n for n, p in model.named_parameters() if p.is_meta)
            except Exception as exc:  # noqa: BLE001
                broken.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=load, args=(f,)) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not broken, broken[:3]
