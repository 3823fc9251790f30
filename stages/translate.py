"""Translate instruction data into every target language with a few-shot LLM prompt.

Each language is a fan-out unit (a concurrent Prefect task in a flow). Records are sorted by
id and cut into fixed shards; each finished shard is written atomically, so a killed run
resumes at the next shard of each language. A record whose translation is empty, identical
to the English source, or of an implausible length is quarantined with the reason.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from polyalign.stages.core.contract import ArtifactWriter, Inputs
from polyalign.stages.core.config import StageConfig, model_field, runtime_field
from polyalign.stages.core.languages import LANGUAGE_NAMES, check_languages

VERSION = "4"
OUTPUTS = ("metrics.json", "README.md", "data/*/*.jsonl")  # in every artifact of this stage
INPUTS = {"data": "English instruction records (self_instruct)"}
FIELDS = ("instruction", "input", "output")


class Config(StageConfig):
    model: str = model_field("Model (name in `models:`) that translates.", remote_ok=True)
    languages: list[str] = Field(..., min_length=1, description="Target language codes.")
    backend: Literal["llm"] = Field("llm", description="llm: few-shot prompting of a causal LM.")
    shots: int = Field(3, ge=0, le=3, description="Built-in example pairs shown per language.")
    keep_source: bool = Field(True, description="Also emit the English records (lang 'en').")
    shard_size: int = Field(16, gt=0, description="Records per shard (the unit of resume).")
    max_new_tokens: int = Field(256, gt=0, description="Token budget of one translated field.")
    min_length_ratio: float = Field(0.3, ge=0, description="Quarantine when target/source chars is below.")
    max_length_ratio: float = Field(3.0, gt=0, description="Quarantine when target/source chars is above.")
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
        if self.min_length_ratio >= self.max_length_ratio:
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
    name = LANGUAGE_NAMES[lang]
    parts = [f"Translate the following texts from English to {name}."]
    parts += [f"English: {src}\n{name}: {tgt}" for src, tgt in shots]
    parts.append(f"English: {text}\n{name}:")
    return "\n\n".join(parts)


def _problem(src: str, tgt: str, cfg: Config) -> str | None:
    if not tgt.strip():
        return "empty translation"
    if len(src.split()) >= 3 and re.sub(r"\W+", "", src.lower()) == re.sub(r"\W+", "", tgt.lower()):
        return "untranslated (identical to the source)"
    if len(src) >= 20:
        ratio = len(tgt) / len(src)
        if ratio < cfg.min_length_ratio or ratio > cfg.max_length_ratio:
            return f"length ratio {ratio:.2f} outside [{cfg.min_length_ratio}, {cfg.max_length_ratio}]"
    return None


def _source_records(inputs: Inputs) -> list[dict]:
    return sorted(inputs["data"].records("data/*.jsonl"), key=lambda r: r["id"])


def run_unit(cfg: Config, inputs: Inputs, out: ArtifactWriter, lang: str) -> None:
    from tqdm.auto import tqdm

    from polyalign.stages.core.backends import Request, run as generate, usage_of

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
            # one request per non-empty field, keyed by record and field; a one-line source
            # gets a one-line translation: stopping at the newline cuts the repetitions small
            # models fall into
            requests = [
                Request(
                    key=f"{lang}/{r['id']}/{f}",
                    prompt=_prompt(r[f], lang, shots),
                    max_new_tokens=cfg.max_new_tokens,
                    stop=stop + (("\n",) if "\n" not in r[f].strip() else ()),
                )
                for r in shard
                for f in FIELDS
                if r.get(f, "").strip()
            ]
            journal = out.journal(f"translate/{lang}/{k:05d}")
            replies = generate(lm, requests, journal, desc=f"translate[{lang}] shard {k}")
            kept, quarantined = [], []
            for src in shard:
                got = {f: replies.get(f"{lang}/{src['id']}/{f}") for f in FIELDS}
                row = {
                    "id": f"{src['id']}-{lang}",
                    "src_id": src["id"],
                    "lang": lang,
                    "split": src.get("split", "train"),
                    "source": "translate",
                    **{f: (g.text if g is not None else "") for f, g in got.items()},
                }
                reasons = []
                for f, g in got.items():
                    if g is None:
                        continue
                    if g.truncated and not cfg.keep_truncated:
                        reasons.append(f"{f}: truncated at max_new_tokens ({cfg.max_new_tokens})")
                    elif p := _problem(src[f], g.text, cfg):
                        reasons.append(f"{f}: {p}")
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
    reasons: dict[str, int] = {}
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
        for row in out.records(f"quarantine/{lang}/*.jsonl", keys=("reason",)):
            for part in row["reason"].split("; "):
                key = re.sub(r"[\d.]+", "N", part.split(": ", 1)[1])
                reasons[key] = reasons.get(key, 0) + 1
        if counts[lang] + quarantine[lang] != len(source):
            raise RuntimeError(f"translate[{lang}]: {counts[lang]}+{quarantine[lang]} records != {len(source)} sources")
    total = sum(counts.values()) + (len(source) if cfg.keep_source else 0)
    out.metrics.update(tokens=tokens, usage={cfg.model: inputs.priced(cfg.model, usage)}, records=total, translated=counts, quarantined=quarantine, quarantine_reasons=reasons)
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
            "empty translations are quarantined",
            "translations identical to the English source (3+ words) are quarantined",
            f"length ratio (target/source characters) outside [{cfg.min_length_ratio}, {cfg.max_length_ratio}] is quarantined",
        ] + [f"quarantined for '{k}': {v}" for k, v in sorted(reasons.items())],
        samples=samples,
        machine_translated=True,
    )
