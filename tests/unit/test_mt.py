"""backend mt: language codes of the three families for every language, and tiny random
seq2seq models of each family (built here) translating through the real transformers code."""

from __future__ import annotations

import pytest

from polyalign.stages.core.backends import GenerationError, Request, run
from polyalign.stages.core.backends.mt import FLORES, ISO3, direction, open_mt
from polyalign.stages.core.languages import LANGUAGE_NAMES
from tests.tiny_seq2seq import build_m2m100, build_marian, build_nllb


@pytest.fixture(scope="module")
def tiny_mt(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    return {
        "nllb": build_nllb(root / "nllb"),
        "m2m100": build_m2m100(root / "m2m100"),
        "wmt21": build_m2m100(root / "wmt21", language_codes="wmt21"),
        "marian": build_marian(root / "marian", tags=[">>fra<<", ">>deu<<", ">>zho<<"]),
        "marian_pair": build_marian(root / "marian_pair"),
    }


def test_every_language_has_a_real_nllb_code_and_m2m100_lacks_only_basque_and_telugu():
    from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES as M2M
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES as NLLB

    assert set(FLORES) == set(LANGUAGE_NAMES) == set(ISO3)
    assert all(FLORES[lang] in NLLB for lang in LANGUAGE_NAMES)
    nllb_vocab = set(NLLB)
    for lang in LANGUAGE_NAMES:
        if lang != "en":
            assert direction(nllb_vocab, "m2m_100", "en", lang, "mt").forced_bos == FLORES[lang]
    m2m_vocab = {f"__{code}__" for code in M2M["m2m100"]}
    missing = []
    for lang in LANGUAGE_NAMES:
        try:
            assert direction(m2m_vocab, "m2m_100", "en", lang, "mt").forced_bos == f"__{lang}__"
        except GenerationError as exc:
            assert f"does not know language '{lang}'" in str(exc) and "\n" not in str(exc)
            missing.append(lang)
    assert sorted(missing) == ["eu", "te"]


def test_marian_tags_are_found_in_any_convention_and_a_pair_model_needs_its_language():
    assert direction({">>fr<<", ">>de<<"}, "marian", "en", "fr", "m").prefix == ">>fr<< "
    assert direction({">>fra<<", ">>deu<<"}, "marian", "en", "fr", "m").prefix == ">>fra<< "
    assert direction({">>cmn_Hans<<", ">>fra<<"}, "marian", "en", "zh", "m").prefix == ">>cmn_Hans<< "
    assert direction({">>srp_Cyrl<<"}, "marian", "en", "sr", "m").prefix == ">>srp_Cyrl<< "
    with pytest.raises(GenerationError, match="no tag for language 'vi'"):
        direction({">>fra<<"}, "marian", "en", "vi", "m")
    assert direction({"▁the"}, "marian", "en", "fr", "m", declared="fr").prefix == ""
    with pytest.raises(GenerationError, match="one language pair"):
        direction({"▁the"}, "marian", "en", "fr", "m")
    with pytest.raises(GenerationError, match="not a translation model"):
        direction({"▁the"}, "llama", "en", "fr", "m")


def _capture(model):
    """Encoder input ids and generated ids of the next generate call."""
    seen = {}
    original = model.generate

    def generate(**kwargs):
        seen["input_ids"] = kwargs["input_ids"].tolist()
        out = original(**kwargs)
        seen["output"] = out.tolist()
        return out

    model.generate = generate
    return seen


@pytest.mark.parametrize("family, target, code", [("nllb", "hi", "hin_Deva"), ("m2m100", "vi", "__vi__")])
def test_source_code_leads_the_input_and_the_target_code_is_forced_first(tiny_mt, family, target, code):
    texts = ["Hello world.", "A much longer sentence with more words in it.", "Short."]
    with open_mt("mt", str(tiny_mt[family]), "float32", "en", target, batch_size=2) as mt:
        seen = _capture(mt.model)
        replies = run(mt, [Request(key=f"k{i}", prompt=t, max_new_tokens=6) for i, t in enumerate(texts)])
        src_id = mt.tok.convert_tokens_to_ids(FLORES["en"] if family == "nllb" else "__en__")
        tgt_id = mt.tok.convert_tokens_to_ids(code)
        assert all(row[0] == src_id for row in seen["input_ids"])  # last batch: one row
        assert all(row[1] == tgt_id for row in seen["output"])  # after the decoder start token
    assert set(replies) == {"k0", "k1", "k2"}
    for reply in replies.values():
        assert reply.completion_tokens <= 6 and code not in reply.text
        assert reply.truncated == (reply.completion_tokens == 6)


def test_marian_multi_target_puts_its_tag_before_the_source(tiny_mt):
    with open_mt("mt", str(tiny_mt["marian"]), "float32", "en", "de") as mt:
        seen = _capture(mt.model)
        run(mt, [Request(key="a", prompt="Good morning.", max_new_tokens=4)])
        assert seen["input_ids"][0][0] == mt.tok.convert_tokens_to_ids(">>deu<<")


def test_unknown_language_and_pair_model_errors_name_the_model(tiny_mt):
    with pytest.raises(GenerationError, match=r"models\.mt: this M2M100 model does not know language 'fr'"):
        with open_mt("mt", str(tiny_mt["wmt21"]), "float32", "en", "fr"):
            pass
    with pytest.raises(GenerationError, match="translate.mt_models"):
        with open_mt("mt", str(tiny_mt["marian_pair"]), "float32", "en", "fr"):
            pass
    with open_mt("mt", str(tiny_mt["marian_pair"]), "float32", "en", "fr", declared="fr") as mt:
        assert run(mt, [Request(key="a", prompt="Good morning.", max_new_tokens=4)])["a"].key == "a"


def test_a_source_longer_than_the_model_positions_is_refused_not_cut(tiny_mt):
    with open_mt("mt", str(tiny_mt["nllb"]), "float32", "en", "fr") as mt:
        replies = run(mt, [Request(key="long", prompt="word " * 400, max_new_tokens=4), Request(key="ok", prompt="Fine.", max_new_tokens=4)])
    assert replies["long"].truncated and replies["long"].text == "" and replies["long"].completion_tokens == 0
    assert replies["ok"].completion_tokens > 0


def test_fertility_counts_tokens_per_word_and_per_character_for_chinese():
    from polyalign.stages.translate import _fertility

    class Chars:  # a tokenizer that makes one token per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    assert _fertility(Chars(), iter(["ab cd", "", "efgh"]), "fr") == 3.0  # 9 characters, 3 words
    assert _fertility(Chars(), iter(["我们 走"]), "zh") == round(4 / 3, 3)
    assert _fertility(Chars(), iter(["", " "]), "fr") is None
