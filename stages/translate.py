"""Translate instruction data into every target language: a few-shot LLM prompt (`backend:
llm`) or a sequence-to-sequence translation model (`backend: mt`: NLLB-200, M2M100, Marian;
stages/core/backends/mt.py maps the language codes).

Each language is a fan-out unit (a concurrent Prefect task in a flow). The English records
are streamed from the input's files in their order and cut into fixed shards; each finished
shard is written atomically, so a killed run resumes at the next shard of each language, and
no more than one shard of records is held in memory.

Before translation, code blocks, inline code, URLs, e-mail addresses, `{placeholders}` and
numbers are masked (stages/core/masking.py) and a field is cut into its paragraphs, each
translated on its own; after it, the paragraphs are joined with the source's own separators
and the masked spans restored. A record is quarantined, with one reason per failing field,
when a restoration fails, a translation is empty or cut by the token budget, or a check
fails (stages/core/quality.py: wrong language or script, an echo of the source, a length
ratio outside the bounds of the target's script, a repetition loop) or, when
`round_trip_chrf` is set, the translation turned back into English scores below that chrF
against the source. The card counts the reasons per language and gives the mean length ratio
of what was kept and the fertility (tokens per word) of a model's tokenizer in each language.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from polyalign.stages.core.contract import ArtifactWriter, Inputs
from polyalign.stages.core.config import StageConfig, model_field, runtime_field
from polyalign.stages.core.languages import LANGUAGE_NAMES, check_languages

VERSION = "6"
OUTPUTS = ("metrics.json", "README.md", "data/*/*.jsonl")  # in every artifact of this stage
INPUTS = {"data": "English instruction records (self_instruct)"}
FIELDS = ("instruction", "input", "output")
Check = Literal["language", "echo", "length", "repetition"]
ALL_CHECKS: tuple[Check, ...] = ("language", "echo", "length", "repetition")
MaskKind = Literal["code", "url", "email", "placeholder", "number"]
ALL_MASKS: tuple[MaskKind, ...] = ("code", "url", "email", "placeholder", "number")


class Config(StageConfig):
    model: str = model_field("Model (name in `models:`) that translates.", remote_ok=True)
    languages: list[str] = Field(..., min_length=1, description="Target language codes.")
    backend: Literal["llm", "mt"] = Field(
        "llm",
        description="llm: few-shot prompting of a causal LM (`model`, local or API); mt: a sequence-to-sequence "
        "translation model (NLLB-200, M2M100, Marian) run here.",
    )
    mt_models: dict[str, str] = model_field(
        "backend mt: a model (name in `models:`) per language, overriding `model` for it (one OPUS-MT "
        "Marian model per language pair, say).",
        default={},
    )
    num_beams: int = Field(1, ge=1, le=16, description="backend mt: beam width (1: greedy).")
    shots: int = Field(3, ge=0, le=3, description="backend llm: built-in example pairs shown per language (0: zero-shot).")
    keep_source: bool = Field(True, description="Also emit the English records (lang 'en').")
    shard_size: int = Field(16, gt=0, description="Records per shard (the unit of resume).")
    max_new_tokens: int = Field(256, gt=0, description="Token budget of one translated field.")
    min_length_ratio: float | None = Field(None, ge=0, description="Quarantine when target/source chars is below (default: by the target's script).")
    max_length_ratio: float | None = Field(None, gt=0, description="Quarantine when target/source chars is above (default: by the target's script).")
    checks: list[Check] = Field(
        default_factory=lambda: list(ALL_CHECKS),
        description="Quality checks that quarantine a record: language (offline language identification and "
        "script), echo (the English source repeated), length (ratio bounds), repetition (loops).",
    )
    mask: list[MaskKind] = Field(
        default_factory=lambda: list(ALL_MASKS),
        description="What is masked during translation and restored after: code blocks and inline code, URLs, "
        "e-mail addresses, {placeholders}, numbers ([] masks nothing). A translator that drops markers "
        "loses the record to quarantine: leave out what it translates faithfully anyway.",
    )
    round_trip_chrf: float | None = Field(
        None,
        ge=0,
        le=100,
        description="Translate each kept field back into English with the same model and quarantine the record "
        "when the chrF (sacrebleu) of the back-translation against the source is below this (default: no "
        "round trip; it doubles the translation work).",
    )
    fertility_model: str | None = model_field(
        "A model (name in `models:`) whose tokenizer's fertility (tokens per word) is reported per language in "
        "the card, usually the base model that sft trains.",
        default=None,
    )
    keep_truncated: bool = Field(
        False,
        description="Keep a field whose translation hit max_new_tokens (default: quarantine the "
        "record; tiny random models never end, so their configs keep).",
    )
    batch_size: int = runtime_field(8, "Prompts per generation batch (local models).", gt=0)

    _langs = field_validator("languages")(lambda cls, v: check_languages(v))

    @model_validator(mode="after")
    def _no_english(self) -> "Config":
        if "en" in self.languages:
            raise ValueError("languages: 'en' is the source language; use keep_source instead")
        if self.min_length_ratio is not None and self.max_length_ratio is not None and self.min_length_ratio >= self.max_length_ratio:
            raise ValueError("min_length_ratio must be below max_length_ratio")
        stray = sorted(set(self.mt_models) - set(self.languages))
        if stray:
            raise ValueError(f"mt_models: {', '.join(stray)} is not among the languages")
        if self.mt_models and self.backend != "mt":
            raise ValueError("mt_models is for backend: mt")
        if self.backend == "mt":
            return self  # shots are for the llm prompt
        table = _shot_table()
        short = [lang for lang in self.languages if len(table.get(lang, [])) < self.shots]
        if short:  # never a silent zero-shot prompt under a fingerprint that says k shots
            have = ", ".join(f"{lang} has {len(table.get(lang, []))}" for lang in short)
            raise ValueError(
                f"shots: {self.shots} built-in examples per language, but {have} "
                f"(built-in: {', '.join(sorted(table))}); set shots: 0 or translate those languages in a separate stage"
            )
        return self


def check_config(cfg: Config, models: dict[str, Any], input_names: set[str]) -> str | None:
    """Config time: backend mt runs its models here, so none of them may be an API model."""
    if cfg.backend != "mt":
        return None
    for field, name in [("model", cfg.model)] + [(f"mt_models.{lang}", n) for lang, n in cfg.mt_models.items()]:
        if models[name].remote:
            return (f"{field}: models.{name} is served over HTTP, but backend mt runs a sequence-to-sequence "
                    "model here; name a local model (path or hub), or use backend: llm")
    return None


def units(cfg: Config) -> list[str]:
    return list(cfg.languages)


def _shot_table() -> dict[str, list[list[str]]]:
    """Built-in English -> language example pairs (stages/data/translate_shots.json)."""
    from polyalign.stages.core.io import builtin

    return json.loads(builtin("translate_shots.json").read_text(encoding="utf-8"))


def _shots(lang: str, n: int) -> list[tuple[str, str]]:
    return [(src, tgt) for src, tgt in _shot_table().get(lang, [])[:n]]


def _prompt(text: str, lang: str, shots: list[tuple[str, str]], source: str = "en") -> str:
    """The few-shot prompt that translates `text` from `source` into `lang` (`shots`: pairs in
    that direction)."""
    from polyalign.stages.core.masking import MARKER

    src_name, name = LANGUAGE_NAMES[source], LANGUAGE_NAMES[lang]
    head = f"Translate the following texts from {src_name} to {name}."
    if MARKER.search(text):
        head += " Copy every marker such as [[1]] unchanged, once, where it belongs in the translation."
    parts = [head]
    parts += [f"{src_name}: {src}\n{name}: {tgt}" for src, tgt in shots]
    parts.append(f"{src_name}: {text}\n{name}:")
    return "\n\n".join(parts)


def _problems(masked_src: str, masked_tgt: str, lang: str, cfg: Config) -> list[str]:
    """Why a translation is not kept (empty when it is). The checks read the prose only: the
    masked field with its markers left out, so code, URLs and numbers neither count in the
    length ratio nor confuse the language check; a field that is all masked spans was not
    translated and is not judged."""
    from polyalign.stages.core import quality
    from polyalign.stages.core.masking import MARKER, only_markers

    if only_markers(masked_src):
        return []
    src, tgt = MARKER.sub(" ", masked_src).strip(), MARKER.sub(" ", masked_tgt).strip()
    if not tgt:
        return ["empty translation"]
    bounds = None
    if cfg.min_length_ratio is not None or cfg.max_length_ratio is not None:
        lo, hi = quality.RATIO_BOUNDS.get(quality.scripts_of(lang)[0], (0.5, 2.2))
        bounds = (cfg.min_length_ratio if cfg.min_length_ratio is not None else lo, cfg.max_length_ratio if cfg.max_length_ratio is not None else hi)
    found = [
        "echo" in cfg.checks and quality.echo(src, tgt),
        "length" in cfg.checks and quality.length_ratio(src, tgt, lang, bounds),
        "language" in cfg.checks and quality.wrong_language(tgt, lang),
        "repetition" in cfg.checks and quality.repetition(src, tgt),
    ]
    return [str(p) for p in found if p]


def _sources(inputs: Inputs) -> Iterator[dict]:
    """The English records, one at a time, in the order of the input's files."""
    return inputs["data"].iter_records("data/*.jsonl")


def _shards(inputs: Inputs, size: int) -> Iterator[tuple[int, list[dict]]]:
    records = _sources(inputs)
    for k in itertools.count():
        shard = list(itertools.islice(records, size))
        if not shard:
            return
        yield k, shard


@contextmanager
def _translators(cfg: Config, inputs: Inputs, lang: str) -> Iterator[tuple[Any, Any]]:
    """(English -> lang, lang -> English or None): the backends of this language."""
    if cfg.backend == "llm":
        with inputs.backend(cfg.model, batch_size=cfg.batch_size, progress=False) as lm:
            yield lm, (lm if cfg.round_trip_chrf is not None else None)
        return
    from polyalign.stages.core.errors import UserError

    name = cfg.mt_models.get(lang, cfg.model)
    declared = lang if lang in cfg.mt_models else None
    with inputs.translator(name, "en", lang, declared, cfg.batch_size, cfg.num_beams) as forward:
        if cfg.round_trip_chrf is None:
            yield forward, None
            return
        if forward.dir.family == "marian" and not forward.dir.prefix:
            raise UserError(
                f"translate.round_trip_chrf: models.{name} translates English to {lang} only (a single-pair Marian "
                "model); the round trip needs a model that also translates back: leave round_trip_chrf unset"
            )
        with inputs.translator(name, lang, "en", None, cfg.batch_size, cfg.num_beams) as back:
            yield forward, back


def _requests(lm_kind: str, key: str, text: str, lang: str, source: str, shots: list[tuple[str, str]], max_new_tokens: int) -> Any:
    """One translation request of a paragraph (`text`, masked) from `source` into `lang`."""
    from polyalign.stages.core.backends import Request

    if lm_kind == "mt":
        return Request(key=key, prompt=text.strip(), max_new_tokens=max_new_tokens)
    # a one-line paragraph gets a one-line translation: stopping at the newline cuts the
    # repetitions small models fall into
    stop = (f"\n{LANGUAGE_NAMES[source]}:", f"\n{LANGUAGE_NAMES[lang]}:", "\n\n") + (("\n",) if "\n" not in text.strip() else ())
    return Request(key=key, prompt=_prompt(text.strip(), lang, shots, source), max_new_tokens=max_new_tokens, stop=stop)


def _chrf(source: str, back: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(back, [source]).score)


def run_unit(cfg: Config, inputs: Inputs, out: ArtifactWriter, lang: str) -> None:
    from polyalign.stages.core.progress import bar as progress_bar

    from polyalign.stages.core.backends import run as generate, usage_of
    from polyalign.stages.core.masking import MARKER, join, mask, only_markers, paragraphs, restore

    total = inputs["data"].count_records("data/*.jsonl")
    n_shards = (total + cfg.shard_size - 1) // cfg.shard_size
    done = sum(out.exists(f"shards/{lang}/{k:05d}.json") for k in range(n_shards))
    if done:
        print(f"[translate:{lang}] resuming: {done}/{n_shards} shards already done")
    if done == n_shards:
        return
    shots = _shots(lang, cfg.shots) if cfg.backend == "llm" else []
    back_shots = [(tgt, src) for src, tgt in shots]
    with _translators(cfg, inputs, lang) as (forward, back):
        bar = progress_bar(total=total, desc=f"translate[{lang}]", unit="rec")
        for k, shard in _shards(inputs, cfg.shard_size):
            if out.exists(f"shards/{lang}/{k:05d}.json"):
                bar.update(len(shard))
                continue
            # one request per paragraph of each non-empty field (masked), keyed by record,
            # field and paragraph
            plans: dict[tuple[str, str], tuple[Any, list[str], list[str]]] = {}
            requests = []
            for r in shard:
                for f in FIELDS:
                    if not r.get(f, "").strip():
                        continue
                    masked = mask(r[f], cfg.mask)
                    paras, seps = paragraphs(masked.text)
                    plans[(r["id"], f)] = (masked, paras, seps)
                    requests += [
                        _requests(cfg.backend, f"{lang}/{r['id']}/{f}/{n}", para, lang, "en", shots, cfg.max_new_tokens)
                        for n, para in enumerate(paras) if not only_markers(para)
                    ]
            journal = out.journal(f"translate/{lang}/{k:05d}")
            replies = generate(forward, requests, journal, desc=f"translate[{lang}] shard {k}")
            rows: dict[str, dict[str, Any]] = {}
            reasons: dict[str, list[str]] = {}
            targets: dict[tuple[str, str], list[str]] = {}
            for src in shard:
                rows[src["id"]] = {"id": f"{src['id']}-{lang}", "src_id": src["id"], "lang": lang, "split": src.get("split", "train"), "source": "translate"}
                reasons[src["id"]] = []
                for f in FIELDS:
                    row, why = rows[src["id"]], reasons[src["id"]]
                    if (src["id"], f) not in plans:
                        row[f] = ""
                        continue
                    masked, paras, seps = plans[(src["id"], f)]
                    got = [replies.get(f"{lang}/{src['id']}/{f}/{n}") for n in range(len(paras))]
                    out_paras = [g.text if g is not None else para for g, para in zip(got, paras)]
                    masked_tgt = join(out_paras, seps)
                    restored, problem = restore(masked_tgt, masked)
                    row[f] = restored if restored is not None else masked_tgt
                    if any(g is not None and g.truncated for g in got) and not cfg.keep_truncated:
                        why.append(f"{f}: truncated at max_new_tokens ({cfg.max_new_tokens})")
                    elif problem:
                        why.append(f"{f}: {problem}")
                    else:
                        why += [f"{f}: {p}" for p in _problems(masked.text, masked_tgt, lang, cfg)]
                        targets[(src["id"], f)] = out_paras
            chrfs: list[float] = []
            if back is not None:
                # the round trip: each field that passed every other check, paragraph by
                # paragraph, back into English, scored against the English prose
                back_requests = [
                    _requests(cfg.backend, f"{lang}/{rid}/{f}/{n}/back", para, "en", lang, back_shots, cfg.max_new_tokens)
                    for (rid, f), paras in targets.items() if not reasons[rid]
                    for n, para in enumerate(paras) if not only_markers(para)
                ]
                back_replies = generate(back, back_requests, journal, desc=f"translate[{lang}] back {k}")
                for (rid, f), paras in targets.items():
                    if reasons[rid] or only_markers(plans[(rid, f)][0].text):
                        continue
                    masked, _, seps = plans[(rid, f)]
                    turned = join([back_replies[f"{lang}/{rid}/{f}/{n}/back"].text if not only_markers(p) else p for n, p in enumerate(paras)], seps)
                    score = _chrf(MARKER.sub(" ", masked.text).strip(), MARKER.sub(" ", turned).strip())
                    chrfs.append(score)
                    if score < cfg.round_trip_chrf:  # type: ignore[operator]
                        reasons[rid].append(f"{f}: round-trip chrF {score:.1f} below {cfg.round_trip_chrf}")
            kept = [rows[r["id"]] for r in shard if not reasons[r["id"]]]
            quarantined = [{**rows[r["id"]], "reason": "; ".join(reasons[r["id"]])} for r in shard if reasons[r["id"]]]
            by_id = {r["id"]: r for r in shard}
            src_chars = sum(len(by_id[row["src_id"]].get(f, "")) for row in kept for f in FIELDS)
            tgt_chars = sum(len(row[f]) for row in kept for f in FIELDS)
            used = usage_of(list(replies.values()))
            out.write_jsonl(f"quarantine/{lang}/{k:05d}.jsonl", quarantined)
            out.write_jsonl(f"data/{lang}/{k:05d}.jsonl", kept)
            # written last: the shard marker
            out.write_json(
                f"shards/{lang}/{k:05d}.json",
                {
                    "kept": len(kept), "quarantined": len(quarantined), "src_chars": src_chars, "tgt_chars": tgt_chars,
                    "chrf_sum": sum(chrfs), "chrf_n": len(chrfs),
                    "tokens": used["prompt_tokens"] + used["completion_tokens"], "usage": used,
                    "retries": forward.usage.retries,
                },
            )
            journal.remove()
            bar.update(len(shard))
        bar.close()


def _fertility(tok: Any, texts: Iterator[str], lang: str, limit: int = 1000) -> float | None:
    """Tokens per word over the first `limit` texts (Chinese: per character, as it puts no
    spaces between words)."""
    tokens = words = 0
    for text in itertools.islice((t for t in texts if t.strip()), limit):
        tokens += len(tok(text, add_special_tokens=False)["input_ids"])
        words += len(re.sub(r"\s", "", text)) if lang == "zh" else len(text.split())
    return round(tokens / words, 3) if words else None


def finish(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    from polyalign.stages.core.cards import render_card

    n_source = inputs["data"].count_records("data/*.jsonl")
    if cfg.keep_source:
        out.write_jsonl("data/en/00000.jsonl", ({**r, "src_id": r["id"], "lang": "en"} for r in _sources(inputs)))
    counts: dict[str, int] = {}
    quarantine: dict[str, int] = {}
    reasons: dict[str, dict[str, int]] = {}
    ratios: dict[str, float | None] = {}
    chrf: dict[str, float | None] = {}
    tokens = 0
    usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    for lang in cfg.languages:
        metas = [
            out.read_json(p.relative_to(out.dir).as_posix(), keys=("kept", "quarantined", "tokens", "src_chars", "tgt_chars"))
            for p in sorted((out.dir / "shards" / lang).glob("*.json"))
        ]
        counts[lang] = sum(m["kept"] for m in metas)
        quarantine[lang] = sum(m["quarantined"] for m in metas)
        tokens += sum(m["tokens"] for m in metas)
        for m in metas:
            for key in usage:
                usage[key] += int(m.get("usage", {}).get(key, 0))
        reasons[lang] = {}
        for row in out.iter_records(f"quarantine/{lang}/*.jsonl", keys=("reason",)):
            for part in row["reason"].split("; "):
                key = re.sub(r"\[\[\d+\]\]", "[[N]]", part.split(": ", 1)[1])
                key = re.sub(r"\d+(\.\d+)?", "N", key)
                reasons[lang][key] = reasons[lang].get(key, 0) + 1
        # characters of the kept translations over those of their English sources
        src_chars, tgt_chars = sum(m["src_chars"] for m in metas), sum(m["tgt_chars"] for m in metas)
        ratios[lang] = round(tgt_chars / src_chars, 3) if src_chars else None
        n_chrf = sum(int(m.get("chrf_n", 0)) for m in metas)
        chrf[lang] = round(sum(float(m.get("chrf_sum", 0.0)) for m in metas) / n_chrf, 2) if n_chrf else None
        if counts[lang] + quarantine[lang] != n_source:
            raise RuntimeError(f"translate[{lang}]: {counts[lang]}+{quarantine[lang]} records != {n_source} sources")
    fertility: dict[str, float | None] = {}
    if cfg.fertility_model is not None:
        from polyalign.stages.core.loading import load_tokenizer

        tok = load_tokenizer(inputs.model(cfg.fertility_model))
        texts = lambda rows: (row.get(f, "") for row in rows for f in FIELDS)  # noqa: E731
        fertility["en"] = _fertility(tok, texts(_sources(inputs)), "en")
        for lang in cfg.languages:
            fertility[lang] = _fertility(tok, texts(out.iter_records(f"data/{lang}/*.jsonl")), lang)
    total = sum(counts.values()) + (n_source if cfg.keep_source else 0)
    out.metrics.update(
        tokens=tokens, usage={cfg.model: inputs.priced(cfg.model, usage)}, records=total, translated=counts,
        quarantined=quarantine, quarantine_reasons=reasons, length_ratio=ratios,
        **({"round_trip_chrf": chrf} if cfg.round_trip_chrf is not None else {}),
        **({"fertility": fertility} if fertility else {}),
    )
    out.summary = "Translated " + ", ".join(
        f"{lang}: {counts[lang]} kept / {quarantine[lang]} quarantined" for lang in cfg.languages
    ) + f" (from {n_source} English records)."
    samples = [row for lang in cfg.languages for row in itertools.islice(out.iter_records(f"data/{lang}/*.jsonl"), 1)]
    if cfg.backend == "mt":
        how = f"machine translation by a sequence-to-sequence model ({'greedy' if cfg.num_beams == 1 else f'beam search, {cfg.num_beams} beams'})"
    else:
        how = f"{cfg.shots}-shot prompt per language" + (" (zero-shot: no examples)" if cfg.shots == 0 else "") + ", greedy decoding"
    per_lang = []
    for lang in cfg.languages:
        line = f"{lang}: {counts[lang]} kept, {quarantine[lang]} quarantined, mean length ratio {ratios[lang]}"
        if cfg.round_trip_chrf is not None:
            line += f", mean round-trip chrF {chrf[lang]}"
        if fertility:
            line += f", fertility {fertility[lang]} tokens per {'character' if lang == 'zh' else 'word'}"
        per_lang.append(line)
    out.card = render_card(
        pretty_name="polyalign translated instruction data",
        description="Instruction data machine-translated from English into "
        + ", ".join(LANGUAGE_NAMES[lang] for lang in cfg.languages) + ".",
        stage="translate",
        stage_version=VERSION,
        fingerprint=out.fingerprint,
        languages=list(cfg.languages) + (["en"] if cfg.keep_source else []),
        counts={**({"en (source)": n_source} if cfg.keep_source else {}), **{f"{k} kept": v for k, v in counts.items()}, **{f"{k} quarantined": v for k, v in quarantine.items()}},
        total=total,
        models=out.models,
        provenance=[f"source: self_instruct artifact {inputs['data'].fingerprint[:12]}", how]
        + ([f"fertility: tokens per word of the tokenizer of models.{cfg.fertility_model} over the first 1000 fields "
            f"of each language (English source: {fertility['en']})"] if fertility else []),
        filters=[
            (f"masked during translation and restored after: {', '.join(cfg.mask)} (a failed restoration quarantines "
             "the record)") if cfg.mask else "nothing masked during translation",
            "fields translated paragraph by paragraph; empty or truncated translations are quarantined",
            f"checks: {', '.join(cfg.checks)}"
            + (" (language: lingua-language-detector where it knows the language, and the script)" if "language" in cfg.checks else ""),
            ("length ratio (target/source characters) bounds: "
             + (f"[{cfg.min_length_ratio}, {cfg.max_length_ratio}] as configured" if cfg.min_length_ratio is not None or cfg.max_length_ratio is not None else "by the target's script")),
        ]
        + ([f"round trip: each field translated back into English by the same model; quarantined below chrF {cfg.round_trip_chrf}"] if cfg.round_trip_chrf is not None else [])
        + per_lang
        + [f"{lang} quarantined for '{k}': {v}" for lang in cfg.languages for k, v in sorted(reasons[lang].items())],
        samples=samples,
        machine_translated=True,
    )
