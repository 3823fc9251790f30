"""Evaluation: multilingual benchmarks by log-likelihood, translation and response quality.

Every pipeline stage is compared side by side: the base model, the base model with the SFT
adapter and with the SFT + aligned adapters. Each language is a fan-out unit.

1. Multiple-choice benchmarks (Okapi's m_arc, m_mmlu, m_hellaswag and the built-in mini
   benchmark). A protocol preset (`okapi` or `lm-eval`, see `core/benchmarks.py`) decides
   template, split, shots and shot sampling; any of them can be overridden per benchmark and
   per language. Each choice is scored by the log-likelihood of " " + choice after the
   context; acc takes the best sum, acc_norm the best sum per character of the choice.
   Standard errors are those of a mean (n-1). A language without a file is reported and the
   others still run.
2. Translation test sets: the model translates source sentences (greedy, chat prompt);
   sacrebleu BLEU and chrF++ against the references.
3. Responses to held-out prompts: mean reward-model score (with a `reward_model` input) and
   the judge's win rate of each stage against the base model (with a `judge` model).

Outputs: results/{lang}.json per unit, predictions/, results.json, results.md (tables of
languages x stages x metrics) and plots/{benchmark}.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from polyalign.stages.core.checked import Checked
from polyalign.stages.core.config import StageConfig, model_field, runtime_field
from polyalign.stages.core.contract import ArtifactWriter, Inputs
from polyalign.stages.core.io import expand_path
from polyalign.stages.core.languages import check_languages

if TYPE_CHECKING:  # torch stays out of config validation
    from polyalign.stages.core.benchmarks import Settings
    from polyalign.stages.core.scoring import ChoiceScorer

VERSION = "5"
OUTPUTS = ("metrics.json", "results.json", "results.md", "results/*.json")  # in every artifact of this stage
INPUTS: dict[str, str] = {}
OPTIONAL_INPUTS = {
    "sft": "the SFT adapter (sft)",
    "aligned": "the aligned adapter (align)",
    "reward_model": "a reward model (reward_model) to score responses to held-out prompts",
}
STAGES = ("base", "sft", "aligned")
Protocol = Literal["okapi", "lm-eval"]


class _Strict(Checked):
    model_config = ConfigDict(extra="forbid")


class Overrides(_Strict):
    """Settings of one benchmark for one language; unset fields keep the benchmark's."""

    source: str | None = Field(None, description="File template or hf:name for this language.")
    split: str | None = Field(None, description="Split evaluated.")
    shot_split: str | None = Field(None, description="Split the shots are drawn from.")
    shots: int | None = Field(None, ge=0, description="Number of in-context examples.")
    template: str | None = Field(None, description="Prompt template (a name or a text with {question}).")
    limit: int | None = Field(None, gt=0, description="Evaluate at most this many documents.")

    @field_validator("template")
    @classmethod
    def _template_known(cls, value: str | None) -> str | None:
        from polyalign.stages.core.benchmarks import TEMPLATES

        if value is not None and value not in TEMPLATES and "{question}" not in value:
            raise ValueError(f"template {value!r} is neither one of {', '.join(TEMPLATES)} nor a text with {{question}}")
        return value


class Benchmark(Overrides):
    """One multiple-choice benchmark. Unset fields come from the protocol preset."""

    task: Literal["arc", "mmlu", "hellaswag", "mc"] = Field(
        "mc", description="Row format and preset family: arc, mmlu, hellaswag (Okapi files) or mc (built-in)."
    )
    source: str = Field(
        "builtin",
        description="'builtin' (mini benchmark), a file path template with {lang} and {split} "
        "(JSON array or JSONL), or 'hf:<dataset>[@revision]' (a Hugging Face dataset, config = language).",
    )
    protocol: Protocol | None = Field(None, description="okapi or lm-eval; default: the stage's `preset`.")
    preprocess: bool | None = Field(None, description="Apply the HellaSwag text clean-up to questions and choices.")
    shot_sampling: Literal["random", "fixed", "first_n"] | None = Field(
        None,
        description="random: shots drawn per document (both harnesses); fixed: one seeded draw "
        "shared by all documents (its prefix is encoded once); first_n: the first shots of the split.",
    )
    seed: int | None = Field(None, description="Seed of the document shuffle and shot draws (okapi 42, lm-eval 1234).")
    languages: dict[str, Overrides] = Field(default_factory=dict, description="Per-language overrides.")

    @model_validator(mode="after")
    def _source_fits_task(self) -> "Benchmark":
        if self.source == "builtin" and self.task != "mc":
            raise ValueError(f"source: the built-in benchmark is task 'mc'; task {self.task!r} needs a file template or hf: name")
        return self


class Translation(_Strict):
    """A translation test set: one source and one reference file per language pair."""

    source: str = Field("builtin", description="'builtin' (mini benchmark questions) or a file template with {src} and {lang}, one sentence per line.")
    reference: str | None = Field(None, description="Reference file template with {src} and {lang}, one sentence per line.")
    source_lang: str = Field("en", description="Language translated from.")
    limit: int | None = Field(None, gt=0, description="Translate at most this many sentences per language.")
    max_new_tokens: int = Field(96, gt=0, description="Token budget of one translation.")

    @model_validator(mode="after")
    def _reference_given(self) -> "Translation":
        if self.source != "builtin" and not self.reference:
            raise ValueError("reference: required when source is a file")
        return self


class Responses(_Strict):
    """Responses to held-out prompts, scored by a reward model and compared by a judge."""

    prompts: str = Field("builtin", description="'builtin' or a JSONL file with id, lang, prompt.")
    judge: str | None = model_field(
        "Judge model (name in `models:`) for win rates against base: a local judge rates each "
        "response (expected 1-5); an API judge ranks each response against base's, in a shuffled order.",
        default=None,
        remote_ok=True,
    )
    judge_method: Literal["auto", "rating", "ranking"] = Field(
        "auto",
        description="rating: each response's expected 1-5 rating from digit log-likelihoods (a local "
        "judge, or a server echoing log-probabilities); ranking: each response ranked against "
        "base's; auto: rating for a local judge, ranking for an API judge.",
    )
    limit: int | None = Field(None, gt=0, description="At most this many prompts per language.")
    max_new_tokens: int = Field(128, gt=0, description="Token budget of one response.")


class Config(StageConfig):
    model: str = model_field("Base model (name in `models:`); adapters come from the inputs.")
    languages: list[str] = Field(..., min_length=1, description="Languages to evaluate.")
    preset: Protocol = Field("okapi", description="Default protocol of the benchmarks: okapi or lm-eval.")
    benchmarks: dict[str, Benchmark] = Field(
        default_factory=lambda: {"mini_mc": Benchmark()},
        description="Multiple-choice benchmarks by name (default: the built-in mini benchmark).",
    )
    limit: int | None = Field(None, gt=0, description="Default cap on documents per benchmark and language.")
    include_base: bool = Field(True, description="Also score the base model without adapters.")
    add_special_tokens: bool | None = Field(
        None,
        description="Tokenize requests with the tokenizer's default special tokens (BOS for Llama, Gemma). "
        "Default: the protocol's choice (lm-eval: yes; okapi: no, as its harness did).",
    )
    translation: Translation | None = Field(None, description="Translation test set (BLEU, chrF++).")
    responses: Responses | None = Field(None, description="Held-out prompts for reward-model scores and judge win rates.")
    batch_size: int = runtime_field(16, "Documents per forward pass.", gt=0)

    _langs = field_validator("languages")(lambda cls, v: check_languages(v))

    @model_validator(mode="after")
    def _files_are_valid(self) -> "Config":
        """Read every local benchmark file now: a malformed row is a config error, not a crash
        after hours of training. Missing files are allowed (reported per language)."""
        from polyalign.stages.core.benchmarks import (
            BenchmarkUnavailable,
            check_pool,
            load_rows,
        )
        from polyalign.stages.core.errors import UserError

        for name, bench in self.benchmarks.items():
            unknown = sorted(set(bench.languages) - set(self.languages))
            if unknown:
                raise ValueError(f"benchmarks.{name}.languages: {', '.join(unknown)} not among the evaluated languages")
            for lang in self.languages:
                s = settings(self, name, lang)
                if s.source.startswith("hf:"):
                    continue
                try:
                    for split in [s.split] + ([s.shot_split] if s.shots else []):
                        try:
                            rows = load_rows(s.task, s.source, lang, split)
                        except (FileNotFoundError, BenchmarkUnavailable):
                            continue  # missing: reported per language; unreadable: that unit fails
                        if split == s.shot_split and s.shots:
                            check_pool(s, len(rows), 0, lang)
                except UserError as exc:
                    raise ValueError(f"benchmarks.{name}: {exc}") from None
        if self.responses is not None:
            from polyalign.stages.core.io import read_jsonl_checked

            prompts = _prompts_path(self.responses)
            if not prompts.is_file():
                raise ValueError(f"responses.prompts: file {str(prompts)!r} does not exist")
            try:  # every row now: a bad one is a config error, not a failed unit after training
                rows = read_jsonl_checked(prompts, {"id": str, "lang": str, "prompt": str})
            except UserError as exc:
                raise ValueError(f"responses.prompts: {exc}") from None
            empty = next((r["id"] for r in rows if not r["prompt"].strip()), None)
            if empty is not None:
                raise ValueError(f"responses.prompts: {prompts}: prompt {empty!r} is empty")
        if self.translation is not None:
            for lang in self.languages:
                if lang == self.translation.source_lang:
                    continue
                try:
                    translation_pairs(self.translation, lang)  # reads both files, compares their lines
                except FileNotFoundError:
                    continue  # a language without a test set is reported per language
                except UserError as exc:
                    raise ValueError(f"translation: {exc}") from None
        return self

    def warnings(self) -> list[str]:
        """What is valid but likely a mistake: a benchmark whose file template finds no file
        for any evaluated language (a missing language is reported and the others run; none at
        all is usually a wrong path)."""
        from polyalign.stages.core.benchmarks import resolve_file

        out = []
        for name in self.benchmarks:
            looked = []
            for lang in self.languages:
                s = settings(self, name, lang)
                path = resolve_file(s.source, lang, s.split)
                if path is None or s.source == "builtin" or path.is_file():
                    break
                looked.append(str(path))
            else:
                if looked:
                    out.append(f"benchmarks.{name}.source: no file for any of its {len(looked)} languages "
                               f"(looked for {looked[0]}, ...); it will be reported missing in every one")
        return out

    def data_files(self) -> dict[str, str]:
        """Every local benchmark and test-set file: their content enters the fingerprint."""
        from polyalign.stages.core.benchmarks import resolve_file

        files: dict[str, str] = {}
        for name in self.benchmarks:
            for lang in self.languages:
                s = settings(self, name, lang)
                for split in sorted({s.split, s.shot_split} if s.shots else {s.split}):
                    path = resolve_file(s.source, lang, split)
                    if path is not None and path.is_file():
                        files[f"benchmarks.{name}.{lang}.{split}"] = str(path)
        if self.translation is not None:
            for lang in self.languages:
                for kind, path in _translation_files(self.translation, lang).items():
                    if path.is_file():
                        files[f"translation.{lang}.{kind}"] = str(path)
        if self.responses is not None:
            files["responses.prompts"] = str(_prompts_path(self.responses))
        return files


def settings(cfg: Config, name: str, lang: str) -> Settings:
    """The resolved settings of benchmark `name` in language `lang` (preset < benchmark < language)."""
    from polyalign.stages.core.benchmarks import PRESETS, PROTOCOL_SEED, Settings

    bench = cfg.benchmarks[name]
    protocol = bench.protocol or cfg.preset
    values: dict[str, Any] = dict(PRESETS[protocol][bench.task])
    values.setdefault("shot_sampling", "random")
    values.update(source=bench.source, limit=cfg.limit, seed=PROTOCOL_SEED[protocol])
    for layer in (bench, bench.languages.get(lang)):
        if layer is None:
            continue
        for key in ("source", "split", "shot_split", "shots", "template", "limit", "preprocess", "shot_sampling", "seed"):
            value = getattr(layer, key, None)
            if value is not None:
                values[key] = value
    return Settings(task=bench.task, protocol=protocol, **values)


def check_inputs(names: set[str]) -> str | None:
    """The aligned adapter and the reward model sit on the SFT model: they need it."""
    for name in ("aligned", "reward_model"):
        if name in names and "sft" not in names:
            return f"input {name!r} needs input 'sft' too (it was trained on top of the SFT model)"
    return None


def units(cfg: Config) -> list[str]:
    return list(cfg.languages)


def _variants(cfg: Config, inputs: Inputs, lang: str | None = None) -> dict[str, list[str]]:
    """Model name -> adapter chain on the base model. With per-language SFT plugins, the SFT
    model of `lang` is its plugin (None: only the names are wanted)."""
    from polyalign.stages.core.adapters import sft_model

    variants: dict[str, list[str]] = {"base": []} if cfg.include_base else {}
    sft = inputs.get("sft")
    if sft is not None:
        if lang is None and sft.metrics.get("plugins"):
            variants["sft"] = []  # the names only (finish): each language has its own plugin
        else:
            variants["sft"] = [sft_model(sft, lang, stage="evaluate", merges=False)]
    aligned = inputs.get("aligned")
    if aligned is not None:
        variants["aligned"] = variants.get("sft", []) + [str(aligned.file("model"))]
    return variants


# ---------------------------------------------------------------------------------------
# multiple choice


def evaluate_benchmark(scorer: ChoiceScorer, s: Settings, lang: str, desc: str | None = None) -> tuple[list, dict]:
    """(documents, metrics incl. predictions) of one benchmark language with one model."""
    from polyalign.stages.core.benchmarks import prepare
    from polyalign.stages.core.scoring import mc_metrics

    docs, contexts, prefix = prepare(s, lang)
    lls = scorer.score(contexts, [[" " + c for c in d.choices] for d in docs], prefix, desc=desc or lang)
    return docs, mc_metrics(lls, docs)


def _describe(s: Settings) -> dict:
    return {k: getattr(s, k) for k in ("task", "protocol", "source", "split", "shot_split", "shots", "template", "shot_sampling", "seed", "limit")}


# ---------------------------------------------------------------------------------------
# translation and responses


def _translation_files(t: Translation, lang: str) -> dict[str, Path]:
    if t.source == "builtin":
        from polyalign.stages.core.benchmarks import builtin_path

        return {"builtin": builtin_path()}
    from polyalign.stages.core.benchmarks import fill_template

    assert t.reference is not None
    return {
        kind: expand_path(fill_template(template, kind, src=t.source_lang, lang=lang))
        for kind, template in (("source", t.source), ("reference", t.reference))
    }


def translation_pairs(t: Translation, lang: str) -> list[tuple[str, str]]:
    """(source, reference) sentence pairs; FileNotFoundError when the language has none."""
    from polyalign.stages.core.errors import UserError

    files = _translation_files(t, lang)
    if "builtin" in files:
        rows = [json.loads(x) for x in files["builtin"].read_text(encoding="utf-8").splitlines() if x.strip()]
        src = {r["qid"]: r["question"] for r in rows if r["lang"] == t.source_lang}
        pairs = [(src[r["qid"]], r["question"]) for r in rows if r["lang"] == lang and r["qid"] in src]
    else:
        for path in files.values():
            if not path.is_file():
                raise FileNotFoundError(str(path))
        lines: dict[str, list[str]] = {}
        for kind in ("source", "reference"):
            try:
                lines[kind] = files[kind].read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise UserError(f"{files[kind]}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        sources, refs = lines["source"], lines["reference"]
        if len(sources) != len(refs):
            raise UserError(f"{files['reference']}: {len(refs)} lines, but {files['source']} has {len(sources)}")
        pairs = list(zip(sources, refs))
    if not pairs:
        raise FileNotFoundError(f"no sentence pairs for {t.source_lang}-{lang}")
    return pairs[: t.limit] if t.limit else pairs


TRANSLATE_PROMPT = "Translate the following text from {src} into {tgt}. Reply with the translation only.\n\n{text}"


def bleu_chrf(hyps: list[str], refs: list[str], lang: str) -> dict:
    import sacrebleu

    tokenize = "zh" if lang.startswith("zh") else ("char" if lang in ("ja", "ko", "th") else "13a")
    bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize)
    chrf = sacrebleu.corpus_chrf(hyps, [refs], word_order=2)
    return {"n": len(hyps), "bleu": round(bleu.score, 4), "chrf++": round(chrf.score, 4), "bleu_tokenize": tokenize}


def _prompts_path(r: Responses) -> Path:
    from polyalign.stages.core.io import builtin

    return builtin("heldout_prompts.jsonl") if r.prompts == "builtin" else expand_path(r.prompts)


def heldout_prompts(r: Responses, lang: str) -> list[dict]:
    from polyalign.stages.core.io import read_jsonl_checked

    rows = [x for x in read_jsonl_checked(_prompts_path(r), {"id": str, "lang": str, "prompt": str}) if x["lang"] == lang]
    if not rows:
        raise FileNotFoundError(f"{_prompts_path(r)} (no prompts for language {lang!r})")
    return rows[: r.limit] if r.limit else rows


# ---------------------------------------------------------------------------------------
# the unit: one language


def run_unit(cfg: Config, inputs: Inputs, out: ArtifactWriter, lang: str) -> None:
    from polyalign.stages.core.loading import use_lm
    from polyalign.stages.core.scoring import ChoiceScorer

    if out.exists(f"results/{lang}.json"):
        return
    path = inputs.model(cfg.model)
    dtype = inputs.model_dtype(cfg.model)
    from polyalign.stages.core.progress import report

    variants = _variants(cfg, inputs, lang)
    result: dict[str, Any] = {"lang": lang, "benchmarks": {}, "tokens": 0}
    parts = len(cfg.benchmarks) * len(variants) + (cfg.translation is not None) + (cfg.responses is not None)
    done = 0
    for name in cfg.benchmarks:
        s = settings(cfg, name, lang)
        entry: dict[str, Any] = {"settings": _describe(s), "models": {}}
        for variant, adapters in variants.items():
            special = cfg.add_special_tokens if cfg.add_special_tokens is not None else s.protocol == "lm-eval"
            with use_lm(path, adapters, dtype) as (model, tok):
                scorer = ChoiceScorer(model, tok, cfg.batch_size, add_special_tokens=special, encoding=s.protocol)
                try:
                    docs, metrics = evaluate_benchmark(scorer, s, lang, desc=f"evaluate[{lang}] {name}/{variant}")
                except FileNotFoundError as exc:
                    entry = {"settings": _describe(s), "missing": f"no file for {lang}: {exc}"}
                    break
            out.write_jsonl(f"predictions/{name}/{lang}/{variant}.jsonl", metrics.pop("predictions"))
            metrics["scoring"] = dict(scorer.stats)
            entry["models"][variant] = metrics
            result["tokens"] += scorer.tokens
            done += 1
            report(done, parts)
        result["benchmarks"][name] = entry
        done = len(result["benchmarks"]) * len(variants)  # a missing benchmark counts as done
        report(done, parts)

    journal = out.journal(f"evaluate/{lang}")  # generations survive a crash inside the unit
    if cfg.translation is not None:
        result["translation"] = _translate_unit(cfg, inputs, out, lang, variants, journal, result)
        done += 1
        report(done, parts)
    if cfg.responses is not None:
        result["responses"] = _responses_unit(cfg, inputs, out, lang, variants, journal, result)
        done += 1
        report(done, parts)
    out.write_json(f"results/{lang}.json", result)
    journal.remove()


def _generate(cfg: Config, inputs: Inputs, adapters: list[str], requests: list[Any], journal: Any, result: dict[str, Any]) -> dict[str, Any]:
    from polyalign.stages.core.backends import run as generate

    with inputs.backend(cfg.model, adapters, batch_size=cfg.batch_size, progress=False) as lm:
        replies = generate(lm, requests, journal)
    result["tokens"] += sum(r.prompt_tokens + r.completion_tokens for r in replies.values())
    return replies


def _translate_unit(
    cfg: Config, inputs: Inputs, out: ArtifactWriter, lang: str, variants: dict[str, list[str]], journal: Any, result: dict[str, Any]
) -> dict[str, Any]:
    from polyalign.stages.core.backends import Request
    from polyalign.stages.core.languages import LANGUAGE_NAMES

    t = cfg.translation
    assert t is not None
    if lang == t.source_lang:
        return {"skipped": f"{lang} is the source language"}
    try:
        pairs = translation_pairs(t, lang)
    except FileNotFoundError as exc:
        return {"missing": f"no translation test set for {t.source_lang}-{lang}: {exc}"}
    scores = {}
    for variant, adapters in variants.items():
        requests = [
            Request.chat(
                f"translation/{variant}/{i}",
                TRANSLATE_PROMPT.format(src=LANGUAGE_NAMES[t.source_lang], tgt=LANGUAGE_NAMES[lang], text=src),
                max_new_tokens=t.max_new_tokens,
                stop=("\n\n",),
            )
            for i, (src, _) in enumerate(pairs)
        ]
        replies = _generate(cfg, inputs, adapters, requests, journal, result)
        hyps = [replies[r.key].text for r in requests]
        out.write_jsonl(
            f"translations/{lang}/{variant}.jsonl",
            [{"source": s, "reference": r, "hypothesis": h} for (s, r), h in zip(pairs, hyps)],
        )
        scores[variant] = bleu_chrf(hyps, [r for _, r in pairs], lang)
    return {"models": scores}


def _responses_unit(
    cfg: Config,
    inputs: Inputs,
    out: ArtifactWriter,
    lang: str,
    variants: dict[str, list[str]],
    journal: Any,
    result: dict[str, Any],
) -> dict[str, Any]:
    from polyalign.stages.core.backends import Request
    from polyalign.stages.core.loading import cached_reward_model, thread_tokenizer
    from polyalign.stages.core.reward import conversation, score

    r = cfg.responses
    assert r is not None
    try:
        prompts = heldout_prompts(r, lang)
    except FileNotFoundError as exc:
        return {"missing": str(exc)}
    answers: dict[str, list[str]] = {}
    for variant, adapters in variants.items():
        requests = [Request.chat(f"responses/{variant}/{p['id']}", p["prompt"], max_new_tokens=r.max_new_tokens) for p in prompts]
        replies = _generate(cfg, inputs, adapters, requests, journal, result)
        answers[variant] = [replies[q.key].text for q in requests]
    metrics: dict[str, dict[str, Any]] = {v: {"n": len(prompts)} for v in answers}
    rm_art = inputs.get("reward_model")
    if rm_art is not None:
        path, dtype = inputs.model(cfg.model), inputs.model_dtype(cfg.model)
        rm = cached_reward_model(path, [variants["sft"][0], str(rm_art.file("model"))], dtype)
        tok = thread_tokenizer(path)
        for variant, texts in answers.items():
            rewards = score(rm, tok, [conversation(p["prompt"], a) for p, a in zip(prompts, texts)], cfg.batch_size)
            metrics[variant]["reward_mean"] = sum(rewards) / len(rewards)
    if r.judge is not None and "base" in answers:
        with inputs.backend(r.judge, batch_size=cfg.batch_size, progress=False) as judge:
            method = r.judge_method if r.judge_method != "auto" else ("ranking" if inputs.spec(r.judge).remote else "rating")
            if method == "rating":
                _rate_against_base(judge, lang, prompts, answers, metrics)
            else:
                _rank_against_base(cfg, judge, lang, prompts, answers, metrics, journal, result)
    out.write_jsonl(
        f"responses/{lang}.jsonl",
        [{"id": p["id"], "prompt": p["prompt"], **{v: answers[v][k] for v in answers}} for k, p in enumerate(prompts)],
    )
    return {"models": metrics}


def _rate_against_base(judge: Any, lang: str, prompts: list[dict], answers: dict[str, list[str]], metrics: dict[str, dict[str, Any]]) -> None:
    from polyalign.stages.core.judge import rate
    from polyalign.stages.core.languages import LANGUAGE_NAMES

    ratings = {}
    for variant, texts in answers.items():
        ratings[variant] = rate(judge, LANGUAGE_NAMES[lang], [(p["prompt"], a) for p, a in zip(prompts, texts)])
        metrics[variant]["judge_rating"] = sum(ratings[variant]) / len(prompts)
    for variant in answers:
        if variant != "base":
            wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ratings[variant], ratings["base"])]
            metrics[variant]["win_rate_vs_base"] = sum(wins) / len(wins)


def _rank_against_base(
    cfg: Config, judge: Any, lang: str, prompts: list[dict], answers: dict[str, list[str]], metrics: dict[str, dict[str, Any]], journal: Any, result: dict[str, Any]
) -> None:
    """Win rate from pairwise rankings (variant vs base, the order shuffled per prompt)."""
    import random

    from polyalign.stages.core.backends import Request
    from polyalign.stages.core.backends import run as generate
    from polyalign.stages.core.judge import parse_ranking, rank_prompt
    from polyalign.stages.core.languages import LANGUAGE_NAMES

    for variant in answers:
        if variant == "base":
            continue
        flips = [random.Random(f"{variant}:{p['id']}").random() < 0.5 for p in prompts]
        requests = []
        for p, mine, base, flip in zip(prompts, answers[variant], answers["base"], flips):
            shown = [base, mine] if flip else [mine, base]
            requests.append(Request.chat(f"judge/{variant}/{p['id']}", rank_prompt(LANGUAGE_NAMES[lang], p["prompt"], shown), max_new_tokens=64))
        replies = generate(judge, requests, journal, desc=f"judge {variant}")
        result["tokens"] += sum(x.prompt_tokens + x.completion_tokens for x in replies.values())
        wins, unparsed = [], 0
        for req, flip in zip(requests, flips):
            tiers = parse_ranking(replies[req.key].text, 2)
            if tiers is None:
                unparsed += 1
                continue
            mine_idx = 1 if flip else 0
            wins.append(0.5 if len(tiers) == 1 else 1.0 if tiers[0] == [mine_idx] else 0.0)
        metrics[variant]["win_rate_vs_base"] = sum(wins) / len(wins) if wins else None
        metrics[variant]["judge_unparseable"] = unparsed


# ---------------------------------------------------------------------------------------
# aggregation and report


def collect(cfg: Config, per_lang: dict[str, dict], variants: list[str]) -> dict:
    """results.json: per benchmark, per language and stage, plus macro averages."""
    benches: dict[str, Any] = {}
    for name in cfg.benchmarks:
        langs, missing = {}, {}
        for lang, res in per_lang.items():
            entry = res["benchmarks"].get(name, {})
            if "missing" in entry:
                missing[lang] = entry["missing"]
            elif entry.get("models"):
                langs[lang] = entry["models"]
        macro: dict[str, dict[str, Any]] = {}
        for v in variants:
            rows = [m[v] for m in langs.values() if v in m and m[v].get("acc") is not None]
            if rows:  # mean over languages; its stderr from the per-language ones (independent sets)
                macro[v] = {"languages": len(rows)}
                for k in ("acc", "acc_norm"):
                    macro[v][k] = sum(r[k] for r in rows) / len(rows)
                    errs = [r[f"{k}_stderr"] for r in rows]
                    macro[v][f"{k}_stderr"] = math.sqrt(sum(e * e for e in errs)) / len(rows) if None not in errs else None
        settings_by_lang = {lang: per_lang[lang]["benchmarks"][name]["settings"] for lang in per_lang if name in per_lang[lang]["benchmarks"]}
        benches[name] = {"languages": langs, "macro": macro, "missing": missing, "settings": settings_by_lang}
    results: dict[str, Any] = {"stages": variants, "benchmarks": benches}
    for kind in ("translation", "responses"):
        if getattr(cfg, kind) is not None:
            results[kind] = {lang: res.get(kind, {}) for lang, res in per_lang.items()}
    return results


def finish(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    from polyalign.stages.core.report import markdown, plot

    per_lang = {lang: out.read_json(f"results/{lang}.json", keys=("tokens",)) for lang in cfg.languages}
    for lang, res in per_lang.items():
        if not isinstance(res.get("benchmarks"), dict):
            raise out.unreadable(out.dir / f"results/{lang}.json", "no 'benchmarks' object", marker=True)
    variants = list(_variants(cfg, inputs))
    results = collect(cfg, per_lang, variants)
    for name, bench in results["benchmarks"].items():
        bench["chance"] = _chance_from_predictions(out, name, bench)
        if bench["languages"]:
            plot(name, bench, variants, out.path(f"plots/{name}.png"))
    out.write_json("results.json", results)
    md = markdown(results)
    out.write_text("results.md", md)
    out.metrics.update(
        tokens=sum(r["tokens"] for r in per_lang.values()),
        results={name: b["macro"] for name, b in results["benchmarks"].items()},
    )
    out.summary = md


def _chance_from_predictions(out: ArtifactWriter, name: str, bench: dict) -> float | None:
    sizes = []
    for lang in bench["languages"]:
        for path in sorted(out.path(f"predictions/{name}/{lang}").glob("*.jsonl"))[:1]:
            rel = path.relative_to(out.dir).as_posix()
            sizes += [len(row["loglikelihoods"]) for row in out.records(rel, keys=("loglikelihoods",))]
    return sum(1 / k for k in sizes) / len(sizes) if sizes else None
