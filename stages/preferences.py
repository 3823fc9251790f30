"""AI-feedback preference pairs: sample k responses per held-out prompt, rank them with a judge.

The policy is the base model with the SFT adapter merged. The judge (the teacher LLM) reads the
instruction and one response and is asked for a rating from 1 to 5; instead of parsing text we
take the probability it gives each rating digit (log-likelihood of each continuation) and use
the expected rating, which is defined for every response and has no parse failures. The best
and worst rated responses form the chosen/rejected pair; ties are quarantined. Work is written
one shard per language and chunk, so a killed run resumes at the next chunk.
"""

from __future__ import annotations


from pydantic import Field, field_validator

from polyalign.stages.core.contract import ArtifactWriter, Inputs
from polyalign.stages.core.config import StageConfig, model_field
from polyalign.stages.core.languages import LANGUAGE_NAMES, check_languages

VERSION = "1"
OUTPUTS = ("metrics.json", "README.md", "data/*/*.jsonl")  # in every artifact of this stage
INPUTS = {
    "data": "instruction records with a heldout split (translate)",
    "policy": "the SFT adapter (sft)",
}



class Config(StageConfig):
    model: str = model_field("Base model (name in `models:`) the SFT adapter belongs to.")
    judge: str = model_field("Judge model (name in `models:`) that rates responses.")
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


def run(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    import torch
    from tqdm.auto import tqdm

    from polyalign.stages.core.cards import render_card
    from polyalign.stages.core.generation import LocalLM, SamplingParams
    from polyalign.stages.core.judge import rate
    from polyalign.stages.core.loading import use_lm
    from polyalign.stages.core.training import user_message

    rows = [r for r in inputs["data"].records("data/*/*.jsonl") if r.get("split") == "heldout"]
    langs = sorted({r["lang"] for r in rows} - ({"en"} if not cfg.include_english else set()))
    if cfg.languages:
        absent = [lang for lang in cfg.languages if lang not in langs]
        if absent:
            from polyalign.stages.core.errors import UserError

            raise UserError(f"preferences.languages: no held-out prompts in {', '.join(absent)} (data has {', '.join(langs) or 'none'})")
        langs = [lang for lang in langs if lang in cfg.languages or (cfg.include_english and lang == "en")]
    if not langs:
        raise RuntimeError("preferences: no held-out prompts in the requested languages")
    by_lang = {lang: sorted((r for r in rows if r["lang"] == lang), key=lambda r: r["id"])[: cfg.prompts_per_language] for lang in langs}

    adapter = str(inputs["policy"].file("model"))
    policy: tuple[str, list[str], str] = (inputs.model(cfg.model), [adapter], inputs.model_dtype(cfg.model))
    judge: tuple[str, list[str], str] = (inputs.model(cfg.judge), [], inputs.model_dtype(cfg.judge))
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.num_responses)
    total = sum(len(v) for v in by_lang.values())
    bar = tqdm(total=total, desc="preferences", unit="prompt")
    for lang in langs:
        prompts = by_lang[lang]
        for k in range(0, len(prompts), cfg.chunk_size):
            chunk_id = f"{lang}/{k // cfg.chunk_size:05d}"
            chunk = prompts[k : k + cfg.chunk_size]
            if out.exists(f"shards/{chunk_id}.json"):
                bar.update(len(chunk))
                continue
            texts = [user_message(r) for r in chunk]
            # one model at a time: the policy and the judge may be one base model
            with use_lm(*policy) as (pm, pt):
                policy_lm = LocalLM(pm, pt, cfg.batch_size, progress=False)
                torch.manual_seed(_seed(cfg.seed, chunk_id))
                responses = policy_lm.generate([policy_lm.chat_prompt(t) for t in texts], params)
            with use_lm(*judge) as (jm, jt):
                judge_lm = LocalLM(jm, jt, cfg.batch_size, progress=False)
                ratings = rate(judge_lm, LANGUAGE_NAMES[lang], [(t, a) for t, resp in zip(texts, responses) for a in resp])
            spans = [0]  # where each prompt's ratings start
            for resp in responses[:-1]:
                spans.append(spans[-1] + len(resp))
            pairs, quarantined = [], []
            for row, text, resp, start in zip(chunk, texts, responses, spans):
                scores = ratings[start : start + len(resp)]
                best = max(range(len(resp)), key=lambda j: scores[j])
                worst = min(range(len(resp)), key=lambda j: scores[j])
                rec = {
                    "id": f"pref-{row['id']}",
                    "prompt_id": row["id"],
                    "lang": lang,
                    "prompt": text,
                    "responses": resp,
                    "scores": [round(s, 5) for s in scores],
                }
                if scores[best] - scores[worst] < cfg.min_margin or resp[best] == resp[worst]:
                    quarantined.append({**rec, "reason": f"tie: rating margin {scores[best] - scores[worst]:.4f} < {cfg.min_margin}"})
                    continue
                pairs.append({**rec, "chosen": resp[best], "rejected": resp[worst], "score_chosen": round(scores[best], 5), "score_rejected": round(scores[worst], 5)})
            out.write_jsonl(f"quarantine/{chunk_id}.jsonl", quarantined)
            out.write_jsonl(f"data/{chunk_id}.jsonl", pairs)
            out.write_json(f"shards/{chunk_id}.json", {"pairs": len(pairs), "quarantined": len(quarantined), "tokens": policy_lm.tokens + judge_lm.tokens})
            bar.update(len(chunk))
    bar.close()

    metas = {p.relative_to(out.dir / "shards").as_posix(): out.read_json(p.relative_to(out.dir).as_posix(), keys=("pairs", "quarantined", "tokens")) for p in sorted((out.dir / "shards").rglob("*.json"))}
    counts = {lang: sum(m["pairs"] for k, m in metas.items() if k.startswith(lang + "/")) for lang in langs}
    ties = {lang: sum(m["quarantined"] for k, m in metas.items() if k.startswith(lang + "/")) for lang in langs}
    total_pairs = sum(counts.values())
    if total_pairs == 0:
        raise RuntimeError("preferences: every prompt was a tie; see quarantine/ in the partial artifact")
    pairs_all = out.records("data/*/*.jsonl", keys=("score_chosen", "score_rejected"))
    margin = sum(p["score_chosen"] - p["score_rejected"] for p in pairs_all) / len(pairs_all)
    out.metrics.update(tokens=sum(m["tokens"] for m in metas.values()), records=total_pairs, pairs=counts, quarantined=ties, mean_margin=round(margin, 4))
    out.summary = f"{total_pairs} preference pairs (" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + f"); {sum(ties.values())} ties quarantined; mean rating margin {margin:.3f}."
    out.card = render_card(
        pretty_name="polyalign AI-feedback preference pairs",
        description=f"Chosen/rejected response pairs: {cfg.num_responses} responses sampled from the SFT model per held-out prompt, ranked by a judge model's expected 1-5 rating.",
        stage="preferences",
        stage_version=VERSION,
        fingerprint=out.fingerprint,
        languages=langs,
        counts={**{f"{k} pairs": v for k, v in counts.items()}, **{f"{k} ties quarantined": v for k, v in ties.items()}},
        total=total_pairs,
        models=out.models,
        provenance=[f"prompts: held-out split of translate artifact {inputs['data'].fingerprint[:12]}", f"policy: SFT adapter {inputs['policy'].fingerprint[:12]}", f"sampling: temperature {cfg.temperature}, top_p {cfg.top_p}, seed {cfg.seed}"],
        filters=[f"pairs whose expected ratings differ by less than {cfg.min_margin} are quarantined as ties"],
        samples=pairs_all[:2],
        machine_translated=True,
    )


def _seed(seed: int, chunk_id: str) -> int:
    import hashlib

    return int(hashlib.sha256(f"{seed}:{chunk_id}".encode()).hexdigest()[:8], 16)
