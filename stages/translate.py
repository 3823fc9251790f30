"""Translate instruction data into every target language with a few-shot LLM prompt.

Each language is a fan-out unit (a concurrent Prefect task in a flow). Records are sorted by
id and cut into fixed shards; each finished shard is written atomically, so a killed run
resumes at the next shard of each language.

Before translation, code blocks, inline code, URLs, e-mail addresses, `{placeholders}` and
numbers are masked (stages/core/masking.py) and a field is cut into its paragraphs, each
translated on its own; after it, the paragraphs are joined with the source's own separators
and the masked spans restored. A record is quarantined, with one reason per failing field,
when a restoration fails, a translation is empty or cut by the token budget, or a check
fails (stages/core/quality.py: wrong language or script, an echo of the source, a length
ratio outside the bounds of the target's script, a repetition loop). The card counts the
reasons per language and gives the mean length ratio of what was kept.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from polyalign.stages.core.contract import ArtifactWriter, Inputs
from polyalign.stages.core.config import StageConfig, model_field, runtime_field
from polyalign.stages.core.languages import LANGUAGE_NAMES, check_languages

VERSION = "5"
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
    backend: Literal["llm"] = Field("llm", description="llm: few-shot prompting of a causal LM.")
    shots: int = Field(3, ge=0, le=3, description="Built-in example pairs shown per language.")
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
        table = _shot_table()
        short = [lang for lang in self.languages if len(table.get(lang, [])) < self.shots]
        if short:  # never a silent zero-shot prompt under a fingerprint that says k shots
            have = ", ".join(f"{lang} has {len(table.get(lang, []))}" for lang in short)
            raise ValueError(
                f"shots: {self.shots} built-in examples per language, but {have} "
                f"(built-in: {', '.join(sorted(table))}); set shots: 0 or translate those languages in a separate stage"
            )
        return self


def units(cfg: Config) -> list[str]:
    return list(cfg.languages)


def _shot_table() -> dict[str, list[list[str]]]:
    """Built-in English -> language example pairs (stages/data/translate_shots.json)."""
    from polyalign.stages.core.io import builtin

    return json.loads(builtin("translate_shots.json").read_text(encoding="utf-8"))


def _shots(lang: str, n: int) -> list[tuple[str, str]]:
    return [(src, tgt) for src, tgt in _shot_table().get(lang, [])[:n]]


def _prompt(text: str, lang: str, shots: list[tuple[str, str]]) -> str:
    from polyalign.stages.core.masking import MARKER

    name = LANGUAGE_NAMES[lang]
    head = f"Translate the following texts from English to {name}."
    if MARKER.search(text):
        head += " Copy every marker such as [[1]] unchanged, once, where it belongs in the translation."
    parts = [head]
    parts += [f"English: {src}\n{name}: {tgt}" for src, tgt in shots]
    parts.append(f"English: {text}\n{name}:")
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


def _source_records(inputs: Inputs) -> list[dict]:
    return sorted(inputs["data"].records("data/*.jsonl"), key=lambda r: r["id"])


def run_unit(cfg: Config, inputs: Inputs, out: ArtifactWriter, lang: str) -> None:
    from tqdm.auto import tqdm

    from polyalign.stages.core.backends import Request, run as generate, usage_of
    from polyalign.stages.core.masking import join, mask, only_markers, paragraphs, restore

    records = _source_records(inputs)
    n_shards = (len(records) + cfg.shard_size - 1) // cfg.shard_size
    todo = [k for k in range(n_shards) if not out.exists(f"shards/{lang}/{k:05d}.json")]
    if len(todo) < n_shards:
        print(f"[translate:{lang}] resuming: {n_shards - len(todo)}/{n_shards} shards already done")
    if not todo:
        return
    with inputs.backend(cfg.model, batch_size=cfg.batch_size, progress=False) as lm:
        shots = _shots(lang, cfg.shots)
        stop = ("\nEnglish:", f"\n{LANGUAGE_NAMES[lang]}:", "\n\n")
        bar = tqdm(total=len(records), initial=(n_shards - len(todo)) * cfg.shard_size, desc=f"translate[{lang}]", unit="rec")
        for k in todo:
            shard = records[k * cfg.shard_size : (k + 1) * cfg.shard_size]
            # one request per paragraph of each non-empty field (masked), keyed by record,
            # field and paragraph; a one-line paragraph gets a one-line translation: stopping
            # at the newline cuts the repetitions small models fall into
            plans: dict[tuple[str, str], tuple[Any, list[str], list[str]]] = {}
            requests = []
            for r in shard:
                for f in FIELDS:
                    if not r.get(f, "").strip():
                        continue
                    masked = mask(r[f], cfg.mask)
                    paras, seps = paragraphs(masked.text)
                    plans[(r["id"], f)] = (masked, paras, seps)
                    for n, para in enumerate(paras):
                        if only_markers(para):
                            continue
                        requests.append(
                            Request(
                                key=f"{lang}/{r['id']}/{f}/{n}",
                                prompt=_prompt(para.strip(), lang, shots),
                                max_new_tokens=cfg.max_new_tokens,
                                stop=stop + (("\n",) if "\n" not in para.strip() else ()),
                            )
                        )
            journal = out.journal(f"translate/{lang}/{k:05d}")
            replies = generate(lm, requests, journal, desc=f"translate[{lang}] shard {k}")
            kept, quarantined = [], []
            for src in shard:
                row = {"id": f"{src['id']}-{lang}", "src_id": src["id"], "lang": lang, "split": src.get("split", "train"), "source": "translate"}
                reasons = []
                for f in FIELDS:
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
                        reasons.append(f"{f}: truncated at max_new_tokens ({cfg.max_new_tokens})")
                    elif problem:
                        reasons.append(f"{f}: {problem}")
                    else:
                        reasons += [f"{f}: {p}" for p in _problems(masked.text, masked_tgt, lang, cfg)]
                if reasons:
                    quarantined.append({**row, "reason": "; ".join(reasons)})
                else:
                    kept.append(row)
            used = usage_of(list(replies.values()))
            out.write_jsonl(f"quarantine/{lang}/{k:05d}.jsonl", quarantined)
            out.write_jsonl(f"data/{lang}/{k:05d}.jsonl", kept)
            # written last: the shard marker
            out.write_json(
                f"shards/{lang}/{k:05d}.json",
                {"kept": len(kept), "quarantined": len(quarantined), "tokens": used["prompt_tokens"] + used["completion_tokens"], "usage": used, "retries": lm.usage.retries},
            )
            journal.remove()
            bar.update(len(shard))
        bar.close()


def finish(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    from polyalign.stages.core.cards import render_card

    source = _source_records(inputs)
    if cfg.keep_source:
        out.write_jsonl("data/en/00000.jsonl", [{**r, "src_id": r["id"], "lang": "en"} for r in source])
    counts: dict[str, int] = {}
    quarantine: dict[str, int] = {}
    reasons: dict[str, dict[str, int]] = {}
    ratios: dict[str, float | None] = {}
    by_id = {r["id"]: r for r in source}
    tokens = 0
    usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    for lang in cfg.languages:
        metas = [out.read_json(p.relative_to(out.dir).as_posix(), keys=("kept", "quarantined", "tokens")) for p in sorted((out.dir / "shards" / lang).glob("*.json"))]
        counts[lang] = sum(m["kept"] for m in metas)
        quarantine[lang] = sum(m["quarantined"] for m in metas)
        tokens += sum(m["tokens"] for m in metas)
        for m in metas:
            for key in usage:
                usage[key] += int(m.get("usage", {}).get(key, 0))
        reasons[lang] = {}
        for row in out.records(f"quarantine/{lang}/*.jsonl", keys=("reason",)):
            for part in row["reason"].split("; "):
                key = re.sub(r"\[\[\d+\]\]", "[[N]]", part.split(": ", 1)[1])
                key = re.sub(r"\d+(\.\d+)?", "N", key)
                reasons[lang][key] = reasons[lang].get(key, 0) + 1
        # characters of the kept translations over those of their English sources
        src_chars = tgt_chars = 0
        for row in out.records(f"data/{lang}/*.jsonl", keys=("src_id",)):
            src = by_id.get(row["src_id"], {})
            src_chars += sum(len(src.get(f, "")) for f in FIELDS)
            tgt_chars += sum(len(row.get(f, "")) for f in FIELDS)
        ratios[lang] = round(tgt_chars / src_chars, 3) if src_chars else None
        if counts[lang] + quarantine[lang] != len(source):
            raise RuntimeError(f"translate[{lang}]: {counts[lang]}+{quarantine[lang]} records != {len(source)} sources")
    total = sum(counts.values()) + (len(source) if cfg.keep_source else 0)
    out.metrics.update(tokens=tokens, usage={cfg.model: inputs.priced(cfg.model, usage)}, records=total, translated=counts, quarantined=quarantine, quarantine_reasons=reasons, length_ratio=ratios)
    out.summary = "Translated " + ", ".join(
        f"{lang}: {counts[lang]} kept / {quarantine[lang]} quarantined" for lang in cfg.languages
    ) + f" (from {len(source)} English records)."
    samples = [r for lang in cfg.languages for r in out.records(f"data/{lang}/00000.jsonl")[:1]]
    out.card = render_card(
        pretty_name="polyalign translated instruction data",
        description="Instruction data machine-translated from English into "
        + ", ".join(LANGUAGE_NAMES[lang] for lang in cfg.languages) + ".",
        stage="translate",
        stage_version=VERSION,
        fingerprint=out.fingerprint,
        languages=list(cfg.languages) + (["en"] if cfg.keep_source else []),
        counts={**({"en (source)": len(source)} if cfg.keep_source else {}), **{f"{k} kept": v for k, v in counts.items()}, **{f"{k} quarantined": v for k, v in quarantine.items()}},
        total=total,
        models=out.models,
        provenance=[f"source: self_instruct artifact {inputs['data'].fingerprint[:12]}", f"{cfg.shots}-shot prompt per language, greedy decoding"],
        filters=[
            (f"masked during translation and restored after: {', '.join(cfg.mask)} (a failed restoration quarantines "
             "the record)") if cfg.mask else "nothing masked during translation",
            "fields translated paragraph by paragraph; empty or truncated translations are quarantined",
            f"checks: {', '.join(cfg.checks)}"
            + (" (language: lingua-language-detector where it knows the language, and the script)" if "language" in cfg.checks else ""),
            ("length ratio (target/source characters) bounds: "
             + (f"[{cfg.min_length_ratio}, {cfg.max_length_ratio}] as configured" if cfg.min_length_ratio is not None or cfg.max_length_ratio is not None else "by the target's script")),
        ]
        + [f"{lang}: {counts[lang]} kept, {quarantine[lang]} quarantined, mean length ratio {ratios[lang]}" for lang in cfg.languages]
        + [f"{lang} quarantined for '{k}': {v}" for lang in cfg.languages for k, v in sorted(reasons[lang].items())],
        samples=samples,
        machine_translated=True,
    )
