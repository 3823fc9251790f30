"""The local generation backend on a tiny model: batching must not change results."""

import pytest

from polyalign.stages.core.backends import Request, run
from polyalign.stages.core.backends.transformers import TransformersBackend
from polyalign.stages.core.loading import load_causal_lm, load_tokenizer
from polyalign.stages.core.model_specs import ModelSpec, TinySpec, models_dir
from polyalign.stages.core.prepare import ensure_model


@pytest.fixture(scope="module")
def tiny_lm():
    path = ensure_model(ModelSpec(tiny=TinySpec(seed=5)), models_dir())
    model, tok = load_causal_lm(path), load_tokenizer(path)
    return model, tok


def test_tiny_tokenizer_round_trips(tiny_lm):
    _, tok = tiny_lm
    for text in ("Quelle planète est la plus proche du Soleil ?", "Thành phố nào", "x = 3 * 4"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids and tok.decode(ids) == text


def texts(lm, prompts, **kwargs):
    requests = [Request(key=str(i), prompt=p, **kwargs) for i, p in enumerate(prompts)]
    replies = run(lm, requests)
    return [replies[r.key].text for r in requests]


def test_loglikelihood_is_batch_invariant(tiny_lm):
    model, tok = tiny_lm
    requests = [("Question: 2+2?\nAnswer:", " 4"), ("Q: colour of the sky\nA:", " blue, mostly"), ("", "hello")]
    one = TransformersBackend(model, tok, batch_size=1, progress=False).loglikelihood(requests)
    many = TransformersBackend(model, tok, batch_size=8, progress=False).loglikelihood(requests)
    for (a, _), (b, _) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-4)
        assert a < 0


def test_greedy_generation_is_batch_invariant_and_in_order(tiny_lm):
    model, tok = tiny_lm
    prompts = ["Translate: hello", "A much longer prompt about the weather in Paris today", "x"]
    one = texts(TransformersBackend(model, tok, batch_size=1, progress=False), prompts, max_new_tokens=8)
    many = TransformersBackend(model, tok, batch_size=3, progress=False)
    out = texts(many, prompts, max_new_tokens=8)
    assert out == one
    assert many.usage.completion_tokens > 0 and many.usage.prompt_tokens > 0 and many.usage.requests == 3


def test_sampling_is_seeded_per_batch_of_requests(tiny_lm):
    model, tok = tiny_lm
    lm = TransformersBackend(model, tok, batch_size=2, progress=False)
    requests = [Request(key=f"{p}/{j}", prompt=p, max_new_tokens=6, temperature=1.0, seed=j) for p in ("a", "b c") for j in range(3)]
    first = run(lm, requests)
    again = run(lm, requests)
    assert {k: r.text for k, r in first.items()} == {k: r.text for k, r in again.items()}
    assert len({r.text for r in first.values()}) > 1  # samples differ from each other


def test_finish_reason_says_when_the_budget_ran_out(tiny_lm):
    """A random tiny model never emits EOS: every reply is cut at max_new_tokens, unless a
    stop string ends it; the caller is told which."""
    model, tok = tiny_lm
    lm = TransformersBackend(model, tok, batch_size=2, progress=False)
    replies = run(lm, [Request(key="a", prompt="Hello there", max_new_tokens=5)])
    assert replies["a"].finish_reason == "length" and replies["a"].completion_tokens == 5
    long = run(lm, [Request(key="b", prompt="Hello there", max_new_tokens=40)])["b"].text
    middle = len(long) // 2
    stop = long[middle : middle + 3]  # text the model is known to write, as a stop string
    assert stop.strip()
    cut = run(lm, [Request(key="c", prompt="Hello there", max_new_tokens=40, stop=(stop,))])["c"]
    assert cut.finish_reason == "stop" and cut.completion_tokens < 40
    assert cut.text == long[: long.find(stop)].strip()


def test_default_chat_template_ends_turns_with_the_models_eos(tiny_lm):
    from polyalign.stages.core.model_specs import DEFAULT_CHAT_TEMPLATE

    _, tok = tiny_lm
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = tok.apply_chat_template(messages, tokenize=False, chat_template=DEFAULT_CHAT_TEMPLATE)
    assert text.endswith("hello" + tok.eos_token + "\n")
    # a base model whose EOS is something else (Gemma: <eos>) gets its own EOS at turn ends
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.eos_token_id) == 2


def test_reward_scoring_leaves_a_shared_tokenizer_left_padded(tiny_lm):
    """The evaluate stage scores responses with the reward model using the tokenizer its
    generation uses: scoring must not flip it to right padding (it once did)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from polyalign.stages.core.reward import score

    lm = TransformersBackend(*tiny_lm, batch_size=2, progress=False)
    cfg = LlamaConfig(vocab_size=len(lm.tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_labels=1, pad_token_id=lm.tok.pad_token_id)
    rm = LlamaForSequenceClassification(cfg).eval()
    before = texts(lm, ["Name a colour.", "Hi"], max_new_tokens=6)
    conv = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend"}], [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]
    score(rm, lm.tok, conv, batch_size=2)
    assert lm.tok.padding_side == "left"
    assert texts(lm, ["Name a colour.", "Hi"], max_new_tokens=6) == before


def test_greedy_decode_loop_matches_transformers_generate(tiny_lm):
    """Our decode loop (own cache handling, rows leaving the batch) writes what
    `model.generate` writes for each prompt alone."""
    import torch

    model, tok = tiny_lm
    prompts = ["Translate: hello", "A much longer prompt about the weather in Paris today", "x y z"]
    ours = texts(TransformersBackend(model, tok, batch_size=3, progress=False), prompts, max_new_tokens=12)
    for prompt, text in zip(prompts, ours):
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            ref = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
        assert text == tok.decode(ref[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_finished_rows_leave_the_batch(tiny_lm):
    """A row that reaches its stop string stops costing compute: later forward passes carry
    only the rows still running, and the other rows' text does not change."""
    model, tok = tiny_lm
    prompts = ["Hello there", "Another prompt that runs long", "third"]
    lm = TransformersBackend(model, tok, batch_size=3, progress=False)
    full = texts(lm, prompts, max_new_tokens=30)
    stop = full[0][4:7]  # text the first row is known to write early
    assert stop.strip() and all(stop not in t for t in full[1:]), "pick a stop string only row 0 writes"
    sizes = []
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        requests = [Request(key=str(i), prompt=p, max_new_tokens=30, stop=(stop,)) for i, p in enumerate(prompts)]
        replies = run(lm, requests)
    finally:
        handle.remove()
    assert replies["0"].finish_reason == "stop" and replies["0"].completion_tokens < 30
    assert [replies[str(i)].text for i in (1, 2)] == full[1:]
    assert sizes[0] == 3 and sizes[-1] == 2 and len(sizes) == 30


def test_nucleus_sampling_with_a_tiny_top_p_is_greedy(tiny_lm):
    model, tok = tiny_lm
    lm = TransformersBackend(model, tok, batch_size=2, progress=False)
    prompts = ["Hello there", "A much longer prompt"]
    greedy = texts(lm, prompts, max_new_tokens=10)
    assert texts(lm, prompts, max_new_tokens=10, temperature=1.0, top_p=1e-6) == greedy
    assert texts(lm, prompts, max_new_tokens=10, temperature=1.0, top_p=1.0) != greedy
