"""The machine-translation backend: a sequence-to-sequence model through transformers.

Three families of translation models name their languages in three ways, and this module
maps polyalign's codes (stages/core/languages.py) onto each:
- NLLB-200 (model type m2m_100, tokenizer NllbTokenizer): FLORES-200 codes such as
  `fra_Latn`. The source is encoded after its code token; the target code is forced as the
  first generated token.
- M2M100: ISO 639-1 codes, tokens `__fr__`; the same two rules. The model knows 100
  languages; what it lacks (Basque, Telugu) is a one-line error naming the language.
- Marian (OPUS-MT): one model per language pair (`opus-mt-en-fr`), or a multi-target model
  whose source text starts with a tag such as `>>fra<<` (the tags are in its vocabulary and
  differ between releases: ISO 639-1, ISO 639-3 or FLORES-style, which we try in that order).
Which family a model is comes from its tokenizer's vocabulary, not its name, so a user's
fine-tuned copy is recognised as well.

A backend translates one direction (`source` to `target`); requests carry the source text as
their `prompt`. Generation is the model's own `generate` (beam search, greedy by default),
batched by source length. A reply that hit `max_new_tokens` is marked truncated; a source
longer than the model's positions is refused (truncated) rather than silently cut.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from .base import GenerationError, OnReplies, Reply, Request, Usage

# polyalign code -> FLORES-200 code (NLLB-200)
FLORES: dict[str, str] = {
    "en": "eng_Latn", "ar": "arb_Arab", "bn": "ben_Beng", "ca": "cat_Latn", "da": "dan_Latn",
    "de": "deu_Latn", "es": "spa_Latn", "eu": "eus_Latn", "fr": "fra_Latn", "gu": "guj_Gujr",
    "hi": "hin_Deva", "hr": "hrv_Latn", "hu": "hun_Latn", "hy": "hye_Armn", "id": "ind_Latn",
    "it": "ita_Latn", "kn": "kan_Knda", "ml": "mal_Mlym", "mr": "mar_Deva", "ne": "npi_Deva",
    "nl": "nld_Latn", "pt": "por_Latn", "ro": "ron_Latn", "ru": "rus_Cyrl", "sk": "slk_Latn",
    "sr": "srp_Cyrl", "sv": "swe_Latn", "ta": "tam_Taml", "te": "tel_Telu", "uk": "ukr_Cyrl",
    "vi": "vie_Latn", "zh": "zho_Hans",
}

# polyalign code -> ISO 639-3 codes a Marian tag may use (macrolanguage first, then individual)
ISO3: dict[str, tuple[str, ...]] = {
    "en": ("eng",), "ar": ("ara", "arb"), "bn": ("ben",), "ca": ("cat",), "da": ("dan",),
    "de": ("deu",), "es": ("spa",), "eu": ("eus",), "fr": ("fra",), "gu": ("guj",),
    "hi": ("hin",), "hr": ("hrv",), "hu": ("hun",), "hy": ("hye",), "id": ("ind",),
    "it": ("ita",), "kn": ("kan",), "ml": ("mal",), "mr": ("mar",), "ne": ("nep", "npi"),
    "nl": ("nld",), "pt": ("por",), "ro": ("ron",), "ru": ("rus",), "sk": ("slk",),
    "sr": ("srp_Cyrl", "srp"), "sv": ("swe",), "ta": ("tam",), "te": ("tel",), "uk": ("ukr",),
    "vi": ("vie",), "zh": ("zho", "cmn_Hans", "cmn"),
}


@dataclass(frozen=True)
class Direction:
    """How one model is told to translate `source` -> `target`."""

    family: str  # nllb, m2m100, marian
    src_lang: str | None  # the tokenizer's src_lang (nllb, m2m100)
    forced_bos: str | None  # token forced first in the output (nllb, m2m100)
    prefix: str  # text put before the source (a Marian target tag)


def family_of(vocab: Collection[str], model_type: str) -> str:
    if "eng_Latn" in vocab:
        return "nllb"
    if "__en__" in vocab:
        return "m2m100"
    if model_type == "marian":
        return "marian"
    raise GenerationError(
        f"backend mt: model type {model_type!r} with no language codes in its vocabulary is not a "
        "translation model polyalign knows (NLLB-200, M2M100, Marian); use backend: llm"
    )


def direction(vocab: Collection[str], model_type: str, source: str, target: str, name: str, declared: str | None = None) -> Direction:
    """The codes that make model `name` translate `source` -> `target`, or a one-line error.

    `declared`: the target language a single-pair Marian model was configured for (its
    vocabulary has no tags, so nothing in the model says which language it writes)."""
    family = family_of(vocab, model_type)
    if family == "nllb":
        codes = {lang: FLORES[lang] for lang in (source, target)}
        missing = [lang for lang, code in codes.items() if code not in vocab]
        if missing:
            raise GenerationError(f"models.{name}: this NLLB model has no code {codes[missing[0]]} for language '{missing[0]}'")
        return Direction(family, codes[source], codes[target], "")
    if family == "m2m100":
        missing = [lang for lang in (source, target) if f"__{lang}__" not in vocab]
        if missing:
            raise GenerationError(f"models.{name}: this M2M100 model does not know language '{missing[0]}' (no token __{missing[0]}__)")
        return Direction(family, source, f"__{target}__", "")
    tags = [t for t in vocab if t.startswith(">>") and t.endswith("<<")]
    if not tags:
        if declared != target:
            raise GenerationError(
                f"models.{name}: this Marian model translates one language pair and writes no target tag; "
                f"give it only the language it translates into (translate.mt_models: {{{target}: ENTRY}})"
            )
        return Direction(family, None, None, "")
    for tag in [f">>{target}<<"] + [f">>{code}<<" for code in ISO3[target]] + [f">>{FLORES[target]}<<"]:
        if tag in vocab:
            return Direction(family, None, None, tag + " ")
    raise GenerationError(f"models.{name}: this multi-target Marian model has no tag for language '{target}' ({len(tags)} tags, e.g. {sorted(tags)[0]})")


_models: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


def load_seq2seq(path: str, dtype: str) -> Any:
    """A sequence-to-sequence model, loaded once per process and shared by every thread."""
    from polyalign.stages.core.loading import LOADING, device, torch_dtype
    from polyalign.stages.core.model_specs import load_kwargs

    key = (path, dtype)
    with _lock:
        if key not in _models:
            from transformers import AutoModelForSeq2SeqLM

            try:
                with LOADING:  # see core.loading: loads are not thread-safe
                    model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch_dtype(dtype), **load_kwargs(path))
            except ValueError as exc:  # a causal LM, say
                raise GenerationError(f"backend mt: {path} is not a sequence-to-sequence model ({str(exc).splitlines()[0][:160]})") from None
            model.to(device())
            model.eval()
            _models[key] = model
        return _models[key]


def release() -> None:
    with _lock:
        _models.clear()


class MTBackend:
    """Translates each request's `prompt` from `source` to `target` (see the module doc)."""

    def __init__(self, model: Any, tokenizer: Any, direction: Direction, name: str = "mt", batch_size: int = 8, num_beams: int = 1, progress: bool = True):
        self.model = model
        self.tok = tokenizer
        self.dir = direction
        self.name = name
        self.batch_size = max(1, batch_size)
        self.num_beams = num_beams
        self.progress = progress
        self.usage = Usage()
        if direction.src_lang is not None:
            self.tok.src_lang = direction.src_lang  # sets the source code token the tokenizer adds
        # M2M100 keeps its language codes out of the special tokens: drop them from outputs
        self.code_ids = set(getattr(tokenizer, "lang_token_to_id", {}).values())
        limit = getattr(model.config, "max_position_embeddings", None) or 1024
        self.max_source_tokens = int(limit)

    def generate(self, requests: Sequence[Request], on_replies: OnReplies, done: Collection[str] = (), desc: str = "translate") -> None:
        todo = [r for r in requests if r.key not in done]
        order = sorted(todo, key=lambda r: (-len(r.prompt or ""), r.key))
        bar = tqdm(total=len(requests), initial=len(requests) - len(todo), desc=desc, unit="req", disable=not self.progress, leave=False)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            replies = self._batch(batch)
            for reply in replies:
                self.usage.add(reply)
            on_replies(replies)
            bar.update(len(batch))
        bar.close()

    def _batch(self, reqs: list[Request]) -> list[Reply]:
        import torch

        if any(r.prompt is None for r in reqs):
            raise ValueError("backend mt translates raw text: a request with chat messages has no source text")
        sources = [self.dir.prefix + (r.prompt or "") for r in reqs]
        lengths = [len(ids) for ids in self.tok(sources)["input_ids"]]
        fits = [n <= self.max_source_tokens for n in lengths]
        replies: dict[str, Reply] = {
            r.key: Reply(key=r.key, text="", finish_reason="length", prompt_tokens=n)
            for r, n, ok in zip(reqs, lengths, fits) if not ok
        }
        run = [(r, s) for r, s, ok in zip(reqs, sources, fits) if ok]
        if run:
            enc = self.tok([s for _, s in run], return_tensors="pt", padding=True).to(self.model.device)
            budget = max(r.max_new_tokens for r, _ in run) + (self.dir.forced_bos is not None)  # the code counts
            extra = {}
            if self.dir.forced_bos is not None:
                extra["forced_bos_token_id"] = self.tok.convert_tokens_to_ids(self.dir.forced_bos)
            with torch.inference_mode():
                out = self.model.generate(**enc, max_new_tokens=budget, num_beams=self.num_beams, do_sample=False, **extra)
            eos = self.model.generation_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
            pad = self.tok.pad_token_id
            start = 1 + (self.dir.forced_bos is not None)  # the decoder start token, then the forced code
            for row, (req, _) in enumerate(run):
                ids = [int(t) for t in out[row].tolist()[start:] if int(t) != pad]
                ended = bool(ids) and ids[-1] in eos_ids
                content = ids[:-1] if ended else ids
                # a shorter budget than the batch's: cut to this request's own
                truncated = not ended or len(content) > req.max_new_tokens
                content = content[: req.max_new_tokens]
                replies[req.key] = Reply(
                    key=req.key,
                    text=self.tok.decode([t for t in content if t not in self.code_ids], skip_special_tokens=True).strip(),
                    finish_reason="length" if truncated else "stop",
                    prompt_tokens=int(enc["attention_mask"][row].sum()),
                    completion_tokens=len(content) + ended,
                )
        return [replies[r.key] for r in reqs]


@contextmanager
def open_mt(name: str, path: str, dtype: str, source: str, target: str, declared: str | None = None, batch_size: int = 8, num_beams: int = 1, progress: bool = True) -> Iterator[MTBackend]:
    """An `MTBackend` for models entry `name` (weights at `path`) translating source -> target."""
    from transformers import AutoConfig, AutoTokenizer

    from polyalign.stages.core.model_specs import load_kwargs

    trust = load_kwargs(path)["trust_remote_code"]
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)  # one per backend: src_lang is tokenizer state
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    vocab = set(tok.get_vocab()) | set(getattr(tok, "lang_token_to_id", {}))  # M2M100 keeps its codes apart
    how = direction(vocab, config.model_type, source, target, name, declared)
    yield MTBackend(load_seq2seq(path, dtype), tok, how, name=name, batch_size=batch_size, num_beams=num_beams, progress=progress)
