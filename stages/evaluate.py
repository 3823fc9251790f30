"""Multilingual multiple-choice evaluation by log-likelihood (acc and acc_norm per language).

Each document becomes a context ("Question: ...\\nAnswer:") and one continuation per choice
(" " + choice text). The prediction is the choice with the highest summed log-likelihood
(acc) or the highest log-likelihood per character of the continuation (acc_norm), the
definitions of lm-evaluation-harness and Okapi. The base model, the SFT model and the aligned
model are scored side by side. Each language is a fan-out unit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import Field, field_validator

from polyalign.stages.core.config import StageConfig, data_file_field, model_field, runtime_field
from polyalign.stages.core.languages import check_languages

VERSION = "1"
INPUTS: dict[str, str] = {}
OPTIONAL_INPUTS = {"sft": "the SFT adapter (sft)", "aligned": "the aligned adapter (align)"}
MC_FIELDS = {"id": str, "lang": str, "question": str, "choices": list, "answer": int}


class Config(StageConfig):
    model: str = model_field("Base model (name in `models:`); adapters come from the inputs.")
    benchmark: str = data_file_field(
        "mini_mc.jsonl", "Multiple-choice JSONL (id, lang, question, choices, answer) or 'builtin'."
    )
    languages: list[str] = Field(..., min_length=1, description="Languages to evaluate.")
    limit: int | None = Field(None, gt=0, description="Evaluate at most this many documents per language.")
    include_base: bool = Field(True, description="Also score the base model without adapters.")
    batch_size: int = runtime_field(16, "Continuations scored per forward pass.", gt=0)

    _langs = field_validator("languages")(lambda cls, v: check_languages(v))

    @field_validator("benchmark")
    @classmethod
    def _benchmark_is_valid(cls, value: str) -> str:
        from polyalign.stages.core.errors import UserError

        if value != "builtin" and not Path(value).expanduser().is_file():
            raise ValueError(f"benchmark file {value!r} does not exist")
        try:  # read it now: a malformed row is a config error, not a crash after training
            load_benchmark(value)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return value


def check_inputs(names: set[str]) -> str | None:
    """The aligned adapter was trained on top of the SFT one: it cannot be applied alone."""
    if "aligned" in names and "sft" not in names:
        return "input 'aligned' needs input 'sft' too (the aligned adapter sits on the SFT model)"
    return None


def units(cfg: Config) -> list[str]:
    return list(cfg.languages)


def load_benchmark(spec: str) -> list[dict]:
    from polyalign.stages.core.errors import UserError
    from polyalign.stages.core.io import builtin, read_jsonl_checked

    path = builtin("mini_mc.jsonl") if spec == "builtin" else Path(spec)
    rows = read_jsonl_checked(path, MC_FIELDS)
    for i, row in enumerate(rows, 1):
        if len(row["choices"]) < 2 or not all(isinstance(c, str) and c for c in row["choices"]):
            raise UserError(f"{path}: row {i}: field 'choices' needs at least two non-empty strings")
        if not 0 <= row["answer"] < len(row["choices"]):
            raise UserError(f"{path}: row {i}: field 'answer' {row['answer']} is out of range")
    return rows


def _variants(cfg: Config, inputs) -> dict[str, list[str]]:  # noqa: ANN001
    variants: dict[str, list[str]] = {"base": []} if cfg.include_base else {}
    sft = inputs.get("sft")
    if sft is not None:
        variants["sft"] = [str(sft.file("model"))]
    aligned = inputs.get("aligned")
    if aligned is not None:
        variants["aligned"] = variants.get("sft", []) + [str(aligned.file("model"))]
    return variants


def score_documents(lm, docs: list[dict]) -> dict:  # noqa: ANN001
    """acc / acc_norm and their standard errors for a list of MC documents."""
    requests, spans = [], []
    for doc in docs:
        spans.append(len(requests))
        context = f"Question: {doc['question']}\nAnswer:"
        requests.extend((context, " " + c) for c in doc["choices"])
    lls = [ll for ll, _ in lm.loglikelihood(requests)]
    hits, hits_norm, preds = [], [], []
    for doc, start in zip(docs, spans):
        scores = lls[start : start + len(doc["choices"])]
        normed = [s / len(" " + c) for s, c in zip(scores, doc["choices"])]
        pred = max(range(len(scores)), key=scores.__getitem__)
        pred_norm = max(range(len(normed)), key=normed.__getitem__)
        hits.append(pred == doc["answer"])
        hits_norm.append(pred_norm == doc["answer"])
        preds.append({"id": doc["id"], "loglikelihoods": scores, "pred": pred, "pred_norm": pred_norm, "answer": doc["answer"]})
    n = len(docs)

    def stderr(xs: list[bool]) -> float:
        if n < 2:
            return float("nan")
        p = sum(xs) / n
        return math.sqrt(p * (1 - p) / (n - 1))

    return {
        "n": n,
        "acc": sum(hits) / n,
        "acc_stderr": stderr(hits),
        "acc_norm": sum(hits_norm) / n,
        "acc_norm_stderr": stderr(hits_norm),
        "predictions": preds,
    }


def run_unit(cfg: Config, inputs, out, lang: str) -> None:  # noqa: ANN001
    from polyalign.stages.core.generation import LocalLM
    from polyalign.stages.core.models import cached_lm

    if out.exists(f"results/{lang}.json"):
        return
    docs = [d for d in load_benchmark(cfg.benchmark) if d["lang"] == lang]
    if cfg.limit:
        docs = docs[: cfg.limit]
    result: dict = {"lang": lang, "n": len(docs), "models": {}}
    tokens = 0
    if docs:
        path = inputs.model(cfg.model)
        for name, adapters in _variants(cfg, inputs).items():
            model, tok = cached_lm(path, adapters, inputs.model_dtype(cfg.model))
            lm = LocalLM(model, tok, cfg.batch_size, progress=False)
            scored = score_documents(lm, docs)
            out.write_jsonl(f"predictions/{lang}/{name}.jsonl", scored.pop("predictions"))
            result["models"][name] = scored
            tokens += lm.tokens
    else:
        result["note"] = f"no documents for language {lang!r} in the benchmark"
    result["tokens"] = tokens
    out.write_json(f"results/{lang}.json", result)


def finish(cfg: Config, inputs, out) -> None:  # noqa: ANN001
    per_lang = {lang: json.loads(out.path(f"results/{lang}.json").read_text()) for lang in cfg.languages}
    variants = list(_variants(cfg, inputs))
    table: dict[str, dict] = {}
    for name in variants:
        rows = {lang: r["models"][name] for lang, r in per_lang.items() if name in r["models"]}
        macro = {
            metric: (sum(v[metric] for v in rows.values()) / len(rows) if rows else None)
            for metric in ("acc", "acc_norm")
        }
        table[name] = {"languages": rows, "macro": macro}
    missing = [lang for lang, r in per_lang.items() if not r["models"]]
    out.write_json("results.json", {"benchmark": cfg.benchmark, "models": table, "languages_without_documents": missing})
    md = markdown_table(table, cfg.languages)
    out.write_text("results.md", md)
    out.metrics.update(tokens=sum(r["tokens"] for r in per_lang.values()), results={k: v["macro"] for k, v in table.items()})
    out.summary = md


def markdown_table(table: dict[str, dict], languages: list[str]) -> str:
    header = "| model | " + " | ".join(f"{lang} acc / acc_norm" for lang in languages) + " | macro acc / acc_norm |"
    lines = [header, "|" + "---|" * (len(languages) + 2)]
    for name, res in table.items():
        cells = []
        for lang in languages:
            r = res["languages"].get(lang)
            cells.append(f"{r['acc']:.3f} / {r['acc_norm']:.3f}" if r else "n/a")
        m = res["macro"]
        macro = f"{m['acc']:.3f} / {m['acc_norm']:.3f}" if m["acc"] is not None else "n/a"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {macro} |")
    return "\n".join(lines) + "\n"


def run(cfg: Config, inputs, out) -> None:  # noqa: ANN001
    for lang in units(cfg):
        run_unit(cfg, inputs, out, lang)
    finish(cfg, inputs, out)
