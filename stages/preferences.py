"""AI-feedback preference pairs: sample k responses per held-out prompt, rank them with a judge.

The policy is the base model with the SFT adapter merged. The judge (the teacher LLM) reads the
instruction and one response and is asked for a rating from 1 to 5; instead of parsing text we
take the probability it gives each rating digit (log-likelihood of each continuation) and use
the expected rating, which is defined for every response and has no parse failures. The best
and worst rated responses form the chosen/rejected pair; ties are quarantined. Work is written
one shard per language and chunk, so a killed run resumes at the next chunk.
"""

from __future__ import annotations


from typing import Any, Literal

from pydantic import Field, field_validator

from polyalign.stages.core.adapters import sft_model
from polyalign.stages.core.contract import ArtifactWriter, Inputs
from polyalign.stages.core.config import StageConfig, model_field
from polyalign.stages.core.languages import LANGUAGE_NAMES, check_languages

VERSION = "3"
OUTPUTS = ("metrics.json", "README.md", "data/*/*.jsonl")  # in every artifact of this stage
INPUTS = {
    "data": "instruction records with a heldout split (translate)",
    "policy": "the SFT adapter (sft)",
}



class Config(StageConfig):
    model: str = model_field("Base model (name in `models:`) the SFT adapter belongs to.")
    judge: str = model_field("Judge model (name in `models:`) that rates responses.", remote_ok=True)
    judge_method: Literal["auto", "rating", "ranking"] = Field(
        "auto",
        description="rating: expected 1-5 rating of each response from the digits' log-likelihoods "
        "(local judge, or an API that returns log-probabilities); ranking: the k responses shown "
        "together in a shuffled order, the judge answers with a ranking (Okapi); auto: rating for "
        "a local judge, ranking for an API judge.",
    )
    judge_retries: int = Field(2, ge=0, description="Ranking: ask again this many times when a reply does not parse.")
    judge_in_english: bool = Field(
        False, description="Ranking: translate prompt and responses into English first, and rank those (as Okapi did)."
    )
    judge_max_new_tokens: int = Field(64, gt=0, description="Ranking: token budget of the judge's reply.")
    translator: str | None = model_field(
        "Model that translates for judge_in_english (default: the judge).", default=None, remote_ok=True
    )
    languages: list[str] = Field(default_factory=list, description="Languages to build pairs for (empty: all).")
    include_english: bool = Field(False, description="Also build pairs for the English prompts.")
    prompts_per_language: int = Field(64, gt=0, description="Held-out prompts per language (at most).")
    num_responses: int = Field(4, ge=2, description="Responses sampled per prompt (k).")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature of the policy.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling of the policy.")
    max_new_tokens: int = Field(256, gt=0, description="Token budget of one response.")
    min_margin: float = Field(0.01, ge=0, description="Quarantine pairs whose expected ratings differ less.")
    chunk_size: int = Field(16, gt=0, description="Prompts per shard (the unit of resume).")
    seed: int = Field(0, description="Sampling seed.")
    batch_size: int = Field(
        8, gt=0, description="Prompts per generation batch. Part of the fingerprint here: with "
        "sampling, the batch layout decides how the random stream is consumed.",
    )

    _langs = field_validator("languages")(lambda cls, v: check_languages(v))


def _heldout_prompts(cfg: Config, inputs: Inputs) -> dict[str, list[dict]]:
    """The first `prompts_per_language` held-out records of each language, in the order of its
    files. A language's records are read one at a time and only until enough are found, and
    other languages' files are not opened for it: memory and reading do not grow with the
    size of the translated data."""
    import itertools

    from polyalign.stages.core.errors import UserError

    data = inputs["data"]
    present = sorted({rel.split("/")[1] for rel in data.listed("data/*/*.jsonl")})
    wanted = [lang for lang in present if lang != "en" or cfg.include_english]
    if cfg.languages:
        wanted = [lang for lang in wanted if lang in cfg.languages or (cfg.include_english and lang == "en")]
    by_lang: dict[str, list[dict]] = {}
    for lang in wanted:
        rows = (r for r in data.iter_records(f"data/{lang}/*.jsonl") if r.get("split") == "heldout")
        by_lang[lang] = list(itertools.islice(rows, cfg.prompts_per_language))
    have = [lang for lang, rows in by_lang.items() if rows]
    absent = [lang for lang in cfg.languages if lang not in have]
    if absent:
        raise UserError(f"preferences.languages: no held-out prompts in {', '.join(absent)} (data has {', '.join(have) or 'none'})")
    if not have:
        raise RuntimeError("preferences: no held-out prompts in the requested languages")
    return {lang: by_lang[lang] for lang in have}


def run(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    from polyalign.stages.core.progress import bar as progress_bar

    from polyalign.stages.core.backends import Request, request_seed, run as generate, usage_of
    from polyalign.stages.core.training import user_message

    by_lang = _heldout_prompts(cfg, inputs)
    langs = list(by_lang)

    adapter = sft_model(inputs["policy"], stage="preferences")
    method = judge_method(cfg, inputs)
    total = sum(len(v) for v in by_lang.values())
    bar = progress_bar(total=total, desc="preferences", unit="prompt")
    retries = 0
    for lang in langs:
        prompts = by_lang[lang]
        for k in range(0, len(prompts), cfg.chunk_size):
            chunk_id = f"{lang}/{k // cfg.chunk_size:05d}"
            chunk = prompts[k : k + cfg.chunk_size]
            if out.exists(f"shards/{chunk_id}.json"):
                bar.update(len(chunk))
                continue
            journal = out.journal(f"preferences/{chunk_id}")
            texts = [user_message(r) for r in chunk]
            # one model at a time: the policy and the judge may be one base model
            with inputs.backend(cfg.model, [adapter], batch_size=cfg.batch_size, progress=False) as policy:
                requests = [
                    Request.chat(
                        key := f"{row['id']}/response/{j}",
                        text,
                        max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature,
                        top_p=cfg.top_p,
                        seed=request_seed(cfg.seed, key),
                    )
                    for row, text in zip(chunk, texts)
                    for j in range(cfg.num_responses)
                ]
                sampled = generate(policy, requests, journal, desc=f"sample {chunk_id}")
                retries += policy.usage.retries
            responses = [[sampled[f"{row['id']}/response/{j}"].text for j in range(cfg.num_responses)] for row in chunk]
            shown_texts, shown_responses, language = texts, responses, LANGUAGE_NAMES[lang]
            if method == "ranking" and cfg.judge_in_english and lang != "en":
                with inputs.backend(cfg.translator or cfg.judge, batch_size=cfg.batch_size, progress=False) as translator:
                    shown_texts, shown_responses = _to_english(cfg, translator, lang, chunk, texts, responses, journal, generate)
                    retries += translator.usage.retries
                language = LANGUAGE_NAMES["en"]
            with inputs.backend(cfg.judge, batch_size=cfg.batch_size, progress=False) as judge:
                verdicts = _judge(cfg, method, judge, language, chunk, shown_texts, shown_responses, journal, generate)
                retries += judge.usage.retries
            pairs, quarantined = [], []
            for row, text, resp, verdict in zip(chunk, texts, responses, verdicts):
                rec = {"id": f"pref-{row['id']}", "prompt_id": row["id"], "lang": lang, "prompt": text, "responses": resp}
                if "problem" in verdict:
                    quarantined.append({**rec, "reason": verdict["problem"], **{k: v for k, v in verdict.items() if k != "problem"}})
                    continue
                scores = verdict["scores"]
                best = max(range(len(resp)), key=lambda j: scores[j])
                worst = min(range(len(resp)), key=lambda j: scores[j])
                rec["scores"] = [round(x, 5) for x in scores]
                if "ranking" in verdict:
                    rec["ranking"] = verdict["ranking"]
                if scores[best] - scores[worst] < cfg.min_margin or resp[best] == resp[worst]:
                    quarantined.append({**rec, "reason": f"tie: margin {scores[best] - scores[worst]:.4f} < {cfg.min_margin}"})
                    continue
                pairs.append({**rec, "chosen": resp[best], "rejected": resp[worst], "score_chosen": round(scores[best], 5), "score_rejected": round(scores[worst], 5)})
            used = usage_of(list(journal_replies(journal)))
            outcome = {kind: sum(v.get("outcome") == kind for v in verdicts) for kind in ("parsed", "unparseable", "tied")}
            out.write_jsonl(f"quarantine/{chunk_id}.jsonl", quarantined)
            out.write_jsonl(f"data/{chunk_id}.jsonl", pairs)
            out.write_json(
                f"shards/{chunk_id}.json",
                {"pairs": len(pairs), "quarantined": len(quarantined), "tokens": used["prompt_tokens"] + used["completion_tokens"], "usage": used, "judge": outcome},
            )
            journal.remove()
            bar.update(len(chunk))
    bar.close()

    metas = {p.relative_to(out.dir / "shards").as_posix(): out.read_json(p.relative_to(out.dir).as_posix(), keys=("pairs", "quarantined", "tokens")) for p in sorted((out.dir / "shards").rglob("*.json"))}
    counts = {lang: sum(m["pairs"] for k, m in metas.items() if k.startswith(lang + "/")) for lang in langs}
    ties = {lang: sum(m["quarantined"] for k, m in metas.items() if k.startswith(lang + "/")) for lang in langs}
    total_pairs = sum(counts.values())
    if total_pairs == 0:
        unparsed = sum(int(m.get("judge", {}).get("unparseable", 0)) for m in metas.values())
        raise RuntimeError(
            f"preferences: no pair left: {sum(ties.values()) - unparsed} prompts tied and {unparsed} got no usable verdict "
            "from the judge; see quarantine/ in the partial artifact"
        )
    pairs_all = out.records("data/*/*.jsonl", keys=("score_chosen", "score_rejected"))
    margin = sum(p["score_chosen"] - p["score_rejected"] for p in pairs_all) / len(pairs_all)
    judged = {lang: {kind: sum(int(m.get("judge", {}).get(kind, 0)) for k, m in metas.items() if k.startswith(lang + "/")) for kind in ("parsed", "unparseable", "tied")} for lang in langs}
    out.metrics.update(
        tokens=sum(m["tokens"] for m in metas.values()),
        records=total_pairs,
        pairs=counts,
        quarantined=ties,
        mean_margin=round(margin, 4),
        judge_method=method,
        judge=judged,
        retries=retries,
    )
    out.summary = f"{total_pairs} preference pairs (" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + f"); {sum(ties.values())} quarantined (ties or unparseable rankings); mean score margin {margin:.3f} ({method} judge)."
    from polyalign.stages.core.cards import render_card

    out.card = render_card(
        pretty_name="polyalign AI-feedback preference pairs",
        description=f"Chosen/rejected response pairs: {cfg.num_responses} responses sampled from the SFT model per held-out prompt, ranked by a judge model "
        + ("that ranks all responses together (shuffled order)." if method == "ranking" else "'s expected 1-5 rating."),
        stage="preferences",
        stage_version=VERSION,
        fingerprint=out.fingerprint,
        languages=langs,
        counts={
            **{f"{k} pairs": v for k, v in counts.items()},
            **{f"{k} quarantined": v for k, v in ties.items()},
            **{f"{k} judge replies {kind}": n for k, d in judged.items() for kind, n in d.items() if method == "ranking"},
        },
        total=total_pairs,
        models=out.models,
        provenance=[f"prompts: held-out split of translate artifact {inputs['data'].fingerprint[:12]}", f"policy: SFT adapter {inputs['policy'].fingerprint[:12]}", f"sampling: temperature {cfg.temperature}, top_p {cfg.top_p}, seed {cfg.seed}"],
        filters=[
            f"pairs whose scores differ by less than {cfg.min_margin} are quarantined as ties",
            *(["rankings that do not name every response once are asked again "
               f"({cfg.judge_retries} times), then the prompt is quarantined with the reply"] if method == "ranking" else []),
            *(["prompt and responses are translated to English before ranking"] if cfg.judge_in_english else []),
        ],
        samples=pairs_all[:2],
        machine_translated=True,
    )


def judge_method(cfg: Config, inputs: Inputs) -> str:
    if cfg.judge_method != "auto":
        return cfg.judge_method
    return "ranking" if inputs.spec(cfg.judge).remote else "rating"


def journal_replies(journal: Any) -> list[Any]:
    from polyalign.stages.core.backends import Reply

    return [Reply.from_json(row) for row in journal.load().values()]


def _judge(cfg: Config, method: str, judge: Any, language: str, chunk: list[dict], texts: list[str], responses: list[list[str]], journal: Any, generate: Any) -> list[dict[str, Any]]:
    """One verdict per prompt: {"scores": [...], "outcome": ...} or {"problem": why, ...}."""
    import random

    from polyalign.stages.core.backends import Request, request_seed
    from polyalign.stages.core.judge import parse_ranking, rank_prompt, rate

    if method == "rating":
        items = [(t, a) for t, resp in zip(texts, responses) for a in resp]
        flat: list[float | None] = list(rate(judge, language, items))
        rated: list[dict[str, Any]] = []
        for n, resp in enumerate(responses):
            scores = flat[n * len(resp) : (n + 1) * len(resp)]
            if any(x is None for x in scores):
                rated.append({"problem": "judge gave no rating", "outcome": "unparseable"})
            else:
                rated.append({"scores": scores, "outcome": "parsed"})
        return rated

    orders = []
    for row, resp in zip(chunk, responses):
        order = list(range(len(resp)))
        random.Random(f"{cfg.seed}:{row['id']}:order").shuffle(order)  # cancels position bias
        orders.append(order)
    verdicts: list[dict[str, Any]] = [{} for _ in chunk]
    pending = list(range(len(chunk)))
    for attempt in range(cfg.judge_retries + 1):
        requests = [
            Request.chat(
                key := f"{chunk[n]['id']}/ranking/{attempt}",
                rank_prompt(language, texts[n], [responses[n][j] for j in orders[n]]),
                max_new_tokens=cfg.judge_max_new_tokens,
                temperature=0.0 if attempt == 0 else 0.7,  # a retry is a fresh draw
                seed=request_seed(cfg.seed, key),
            )
            for n in pending
        ]
        got = generate(judge, requests, journal, desc=f"rank (try {attempt + 1})")
        still = []
        for n, req in zip(pending, requests):
            tiers = parse_ranking(got[req.key].text, len(orders[n]))
            if tiers is None:
                verdicts[n] = {"problem": f"unparseable ranking after {attempt + 1} tries", "judge_reply": got[req.key].text, "outcome": "unparseable"}
                still.append(n)
                continue
            k = len(orders[n])
            scores = [0.0] * k
            ranking = []
            for tier in tiers:  # a response scores the number of responses ranked below it
                below = sum(len(t) for t in tiers[tiers.index(tier) + 1 :])
                for shown in tier:
                    scores[orders[n][shown]] = float(below)
                ranking.append([orders[n][shown] for shown in tier])
            verdicts[n] = {"scores": scores, "ranking": ranking, "outcome": "tied" if len(tiers) == 1 else "parsed"}
        pending = still
        if not pending:
            break
    return verdicts


def _to_english(cfg: Config, translator: Any, lang: str, chunk: list[dict], texts: list[str], responses: list[list[str]], journal: Any, generate: Any) -> tuple[list[str], list[list[str]]]:
    from polyalign.stages.core.backends import Request

    def ask(key: str, text: str) -> Any:
        instruction = f"Translate the following {LANGUAGE_NAMES[lang]} text into English. Reply with the translation only.\n\n{text}"
        return Request.chat(key, instruction, max_new_tokens=cfg.max_new_tokens * 2)

    requests = []
    for row, text, resp in zip(chunk, texts, responses):
        requests.append(ask(f"{row['id']}/english/prompt", text))
        requests += [ask(f"{row['id']}/english/{j}", a) for j, a in enumerate(resp)]
    got = generate(translator, requests, journal, desc="to English")
    en_texts = [got[f"{row['id']}/english/prompt"].text for row in chunk]
    en_resp = [[got[f"{row['id']}/english/{j}"].text for j in range(len(resp))] for row, resp in zip(chunk, responses)]
    return en_texts, en_resp
