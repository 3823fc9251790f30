"""The choice scorer against the plain per-request computation (lm-eval's), on tiny models."""

from __future__ import annotations

import pytest
import torch

from polyalign.stages.core import benchmarks as B
from polyalign.stages.core.scoring import ChoiceScorer

TEXT = [
    "Which planet is closest to the Sun? Mercury is the closest planet.",
    "Water boils at one hundred degrees at sea level.",
    "The heart pumps blood through the body.",
    "Plants make food from light, water and air.",
] * 20


@pytest.fixture(scope="module")
def byte_level():
    """A GPT-2-style byte-level BPE tokenizer (as SmolLM2's) and a random Llama on it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TEXT + ["Question: x\nAnswer: y\n\n"] * 5, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval(), tok


def _docs(n: int) -> list[B.Doc]:
    return [B.Doc(f"d{i}", f"Question: {TEXT[i][:30]}?\nAnswer:", [TEXT[i + 1][:12], TEXT[i + 2][:20], "no", TEXT[i + 3][:7]], i % 4) for i in range(n)]


def _reference(scorer: ChoiceScorer, contexts, conts):
    from tqdm import tqdm

    enc = [(scorer.encode(c, x[0])[0], [scorer.encode(c, y)[1] for y in x]) for c, x in zip(contexts, conts)]
    out = [[] for _ in enc]
    scorer._per_request(enc, list(range(len(enc))), out, tqdm(disable=True))
    return out


@pytest.mark.parametrize("batch_size", [1, 3])
def test_shared_prefix_is_used_even_when_its_last_tokens_merge(byte_level, batch_size):
    model, tok = byte_level
    assert tok("A\n\n")["input_ids"][-1] not in tok("A\n\nQuestion")["input_ids"]  # the trap
    shots = _docs(8)[4:]
    prefix = "".join(f"{B.shot_text(s)}\n\n" for s in shots)
    docs = _docs(4)
    contexts = [prefix + d.query for d in docs]
    conts = [[" " + c for c in d.choices] for d in docs]
    scorer = ChoiceScorer(model, tok, batch_size=batch_size, progress=False)
    got = scorer.score(contexts, conts, prefix)
    assert scorer.stats == {"cached": 0, "prefixed": 4, "per_request": 0}
    want = _reference(scorer, contexts, conts)
    assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)) < 1e-4


def test_batched_contexts_of_different_lengths_match(byte_level):
    model, tok = byte_level
    docs = _docs(6)
    contexts = [("Some words. " * (3 * i)) + d.query for i, d in enumerate(docs)]
    conts = [[" " + c for c in d.choices] for d in docs]
    scorer = ChoiceScorer(model, tok, batch_size=4, progress=False)
    got = scorer.score(contexts, conts)
    assert scorer.stats["cached"] == 6
    want = _reference(scorer, contexts, conts)
    assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)) < 1e-4


def test_requests_longer_than_the_model_are_truncated_like_lm_eval(byte_level):
    model, tok = byte_level
    docs = _docs(2)
    contexts = [("Some words. " * 40) + d.query for d in docs]
    conts = [[" " + c for c in d.choices] for d in docs]
    scorer = ChoiceScorer(model, tok, batch_size=2, max_length=64, progress=False)
    got = scorer.score(contexts, conts)
    assert scorer.stats["per_request"] == 2
    # lm-eval: keep the last max_length + 1 tokens of context + continuation, feed all but the
    # last, and score the continuation's tokens at the end of that window
    for ctx, choices, scores in zip(contexts, conts, got):
        for cont, ll in zip(choices, scores):
            ctx_ids, cont_ids = scorer.encode(ctx, cont)
            window = (ctx_ids + cont_ids)[-(64 + 1) :]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([window[:-1]])).logits[0].float(), -1)
            n = len(cont_ids)
            want = sum(logp[len(window) - 1 - n + k, cont_ids[k]].item() for k in range(n))
            assert ll == pytest.approx(want, abs=1e-4)
    full = ChoiceScorer(model, tok, batch_size=2, progress=False).score(contexts, conts)
    assert got != full  # and the truncation did change the numbers


def _model(kind: str, vocab: int):
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(1)
    if kind == "bloom":  # ALiBi: no position ids
        return BloomForCausalLM(BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2, n_head=4)).eval()
    if kind == "sliding":  # a window shorter than the contexts
        cfg = MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=40, max_position_embeddings=4096)
        return MistralForCausalLM(cfg).eval()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=4096)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("kind", ["eager", "sliding", "bloom"])
def test_every_path_matches_per_request_scoring_across_architectures(byte_level, kind):
    _, tok = byte_level
    model = _model(kind, len(tok))
    docs = _docs(6)
    # contexts of very different lengths batched together, and a shared shot prefix
    contexts = [("Some words. " * (2 * i)) + d.query for i, d in enumerate(docs)]
    conts = [[" " + c for c in d.choices] for d in docs]
    prefix = "".join(f"{B.shot_text(s)}\n\n" for s in _docs(9)[6:])
    for ctxs, pre in ((contexts, None), ([prefix + d.query for d in docs], prefix)):
        scorer = ChoiceScorer(model, tok, batch_size=4, progress=False)
        got = scorer.score(ctxs, conts, pre)
        assert scorer.stats["per_request"] == 0
        want = _reference(scorer, ctxs, conts)
        assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)) < 1e-4, (kind, pre is not None)


def test_okapi_encoding_tokenizes_context_and_continuation_apart(byte_level):
    model, tok = byte_level
    lm_eval_style = ChoiceScorer(model, tok, progress=False, add_special_tokens=True)
    okapi_style = ChoiceScorer(model, tok, progress=False, add_special_tokens=False, encoding="okapi")
    ctx, cont = okapi_style.encode("Answer:", " Mercury")
    assert ctx == tok("Answer:", add_special_tokens=False)["input_ids"]
    assert cont == tok(" Mercury", add_special_tokens=False)["input_ids"]
    assert lm_eval_style.encode("Answer: ", "Mercury")[1] == tok("Answer: Mercury")["input_ids"][len(tok("Answer:")["input_ids"]) :]


def test_sliding_window_batches_stay_inside_the_window(byte_level):
    _, tok = byte_level
    model = _model("sliding", len(tok))  # window 40
    long_ctx = TEXT[0] + " " + TEXT[1] + " Answer:"  # ~28 tokens, short choices
    short_ctx = "Answer:"  # a few tokens, long choices
    contexts = [long_ctx, short_ctx]
    conts = [[" no", " yes"], [" " + TEXT[2] + " " + TEXT[3], " " + TEXT[3]]]  # ~20 tokens
    lengths = [len(tok(c + x[0])["input_ids"]) for c, x in zip(contexts, conts)]
    assert all(n <= 40 for n in lengths)  # each fits the window alone, not once padded together
    scorer = ChoiceScorer(model, tok, batch_size=4, progress=False)
    got = scorer.score(contexts, conts)
    want = _reference(scorer, contexts, conts)
    assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)) < 1e-4
