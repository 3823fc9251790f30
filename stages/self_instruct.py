"""Self-Instruct: a teacher LLM writes new English tasks from seed tasks (Wang et al., 2022).

Work proceeds in rounds of `round_size` requests to the teacher. Two methods:

- `alpaca` (Taori et al., 2023; what Okapi used, the default): each request shows 3 seed
  tasks with their input and output and asks for about `tasks_per_request` new tasks written
  the same way (instruction, input or <noinput>, output); only a last item cut by the token
  budget is dropped as truncated.
- `single`: each request shows `prompt_seed_tasks` seed and `prompt_machine_tasks` earlier
  machine instructions and asks for one more; the teacher then writes an instance (input and
  output) for each instruction kept. For small or random models that cannot write a list.

Candidates then pass the published filters (stages/core/tasks.py: length in words, blocked
words, "Write a program", a first character that is punctuation or not ASCII; an instance
with an empty output or an input equal to its output) and the ROUGE-L novelty filter
(stages/core/novelty.py: dropped above `max_rouge_l`, 0.7 as in the papers, against the seeds
and every instruction kept before). A round is written as one shard, so a killed run resumes
at the next round with an identical pool; replies inside a round are journaled. Every
dropped candidate is kept in `quarantine/` with its reason, and the card counts them.
"""

from __future__ import annotations

import random
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from polyalign.stages.core.config import StageConfig, data_file_field, model_field
from polyalign.stages.core.contract import ArtifactWriter, Inputs
from polyalign.stages.core.io import expand_path
from polyalign.stages.core.tasks import BLOCKLIST

VERSION = "5"
OUTPUTS = ("metrics.json", "README.md", "data/*.jsonl")  # in every artifact of this stage
INPUTS: dict[str, str] = {}

class Config(StageConfig):
    teacher: str = model_field("Model (name in `models:`) that writes instructions and instances.", remote_ok=True)
    seed_tasks: str = data_file_field(
        "seed_tasks.jsonl", "Seed tasks JSONL in Self-Instruct format, or 'builtin' (shipped)."
    )
    method: Literal["alpaca", "self_instruct", "single"] = Field(
        "alpaca",
        description="alpaca: about tasks_per_request tasks (instruction, input, output) per request from 3 "
        "seed tasks, as Okapi did; self_instruct: the original: instructions first from 8 in-context ones "
        "(6 seed, 2 machine), then a classification check and instances written input-first or "
        "output-first; single: one instruction per request, then one instance per kept instruction "
        "(for small or random models).",
    )
    num_instructions: int = Field(100, gt=0, description="Stop once this many instructions are kept.")
    max_rounds: int = Field(50, gt=0, description="Give up after this many rounds even if short.")
    round_size: int = Field(5, gt=0, description="Requests to the teacher per round.")
    tasks_per_request: int = Field(20, ge=1, description="alpaca: new tasks asked for in each request.")
    prompt_seed_tasks: int | None = Field(
        None, ge=1, description="Seed tasks shown in each request (default: alpaca 3, self_instruct and single 6)."
    )
    prompt_machine_tasks: int = Field(2, ge=0, description="self_instruct, single: earlier machine instructions per prompt.")
    instance_shots: int = Field(3, ge=0, description="self_instruct, single: seed examples shown when writing instances.")
    classification_shots: int = Field(12, ge=2, description="self_instruct: labelled seed tasks shown to the classification check.")
    instance_format: Literal["input_output", "output_only"] = Field(
        "input_output",
        description="single: input_output: the teacher writes an optional input, then the output; "
        "output_only: tasks without input, the teacher writes only the output.",
    )
    temperature: float | None = Field(None, ge=0, description="Sampling temperature (default: alpaca 1.0, self_instruct 0.7, single 0.8).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (default: alpaca 1.0, self_instruct 0.5, single 0.95).")
    max_request_tokens: int | None = Field(None, gt=0, description="alpaca, self_instruct: token budget of one list (default 3072, 1024).")
    max_instruction_tokens: int = Field(48, gt=0, description="single: token budget of one instruction.")
    max_instance_tokens: int | None = Field(None, gt=0, description="Token budget of one instance reply (default: self_instruct 300, single 160).")
    min_words: int = Field(4, ge=1, description="Drop instructions of fewer words (4 as published).")
    max_words: int = Field(150, ge=1, description="Drop instructions of more words (150 as published).")
    max_rouge_l: float = Field(0.7, gt=0, le=1, description="Drop when ROUGE-L to a kept one exceeds this.")
    blocklist: list[str] = Field(default_factory=lambda: list(BLOCKLIST), description="Words (whole, any case) that drop an instruction.")
    heldout_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of records marked split=heldout (preference prompts)."
    )
    seed: int = Field(0, description="Random seed of demonstration sampling and generation.")
    keep_truncated: bool = Field(
        False,
        description="Keep an instruction, instance or last listed task that hit its token budget (default: "
        "quarantine it, as the papers do; tiny random models never end, so their configs keep).",
    )
    batch_size: int = Field(
        8, gt=0, description="Prompts per generation batch of a local model. Part of the fingerprint "
        "here: with sampling, the batch layout decides how the random stream is consumed.",
    )

    @property
    def shown_seeds(self) -> int:
        return self.prompt_seed_tasks or (3 if self.method == "alpaca" else 6)

    @property
    def sampling(self) -> tuple[float, float]:
        default = {"alpaca": (1.0, 1.0), "self_instruct": (0.7, 0.5), "single": (0.8, 0.95)}[self.method]
        return (self.temperature if self.temperature is not None else default[0], self.top_p or default[1])

    @property
    def request_tokens(self) -> int:
        return self.max_request_tokens or (3072 if self.method == "alpaca" else 1024)

    @property
    def instance_tokens(self) -> int:
        return self.max_instance_tokens or (300 if self.method == "self_instruct" else 160)

    @field_validator("seed_tasks")
    @classmethod
    def _seed_file_is_valid(cls, value: str) -> str:
        from polyalign.stages.core.errors import UserError

        if value != "builtin" and not expand_path(value).is_file():
            raise ValueError(f"seed tasks file {value!r} does not exist")
        try:  # read it now: a bad row is a config error, not a crash halfway through a run
            load_seed_tasks(value)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.min_words > self.max_words:
            raise ValueError("min_words must not exceed max_words")
        return self


# a seed task is shown in the teacher's prompts: one far longer than any real task is a mistake
MAX_SEED_CHARS = 20_000


def load_seed_tasks(spec: str) -> list[dict]:
    from polyalign.stages.core.io import builtin, read_jsonl_checked

    path = builtin("seed_tasks.jsonl") if spec == "builtin" else spec
    from polyalign.stages.core.errors import UserError

    rows = read_jsonl_checked(path, {"instruction": str, "instances": list})
    for i, row in enumerate(rows, 1):
        where = f"{path}: record {i}"
        if not row["instruction"].strip():
            raise UserError(f"{where}: field 'instruction' is empty")
        if len(row["instruction"]) > MAX_SEED_CHARS:
            raise UserError(f"{where}: field 'instruction' has {len(row['instruction']):,} characters "
                            f"(at most {MAX_SEED_CHARS:,}: a seed task is shown in every prompt)")
        for k, inst in enumerate(row["instances"], 1):
            if not isinstance(inst, dict):
                raise UserError(f"{where}: instance {k} is a {type(inst).__name__}, not an object with input and output")
            for field in ("input", "output"):
                value = inst.get(field, "")
                if not isinstance(value, str):
                    raise UserError(f"{where}: instance {k}: field {field!r} has type {type(value).__name__}, not text")
                if len(value) > MAX_SEED_CHARS:
                    raise UserError(f"{where}: instance {k}: field {field!r} has {len(value):,} characters "
                                    f"(at most {MAX_SEED_CHARS:,})")
        row.setdefault("id", f"seed_{i}")
    return rows


def _instruction_prompt(seed_demos: list[str], machine_demos: list[str]) -> str:
    demos = seed_demos + machine_demos
    lines = ["Come up with a series of diverse tasks for a helpful assistant:"]
    lines += [f"Task {i}: {text}" for i, text in enumerate(demos, 1)]
    lines.append(f"Task {len(demos) + 1}:")
    return "\n".join(lines)


def _instance_prompt(shots: list[dict], instruction: str, fmt: str) -> str:
    parts = []
    for task in shots:
        inst = task["instances"][0] if task["instances"] else {"input": "", "output": ""}
        block = f"Instruction: {task['instruction']}\n"
        if fmt == "input_output":
            block += f"Input: {inst.get('input') or '<noinput>'}\n"
        parts.append(block + f"Output: {inst.get('output', '')}")
    head = f"Instruction: {instruction}\n" + ("Input:" if fmt == "input_output" else "Output:")
    return "\n\n".join(parts + [head])


def _parse_instance(text: str, fmt: str) -> tuple[str, str] | None:
    if fmt == "output_only":
        return "", text.strip()
    m = re.match(r"\s*(.*?)\s*\nOutput:\s*(.*)", text, flags=re.S)
    if not m:
        return None
    task_input, output = m.group(1).strip(), m.group(2)
    # small teachers often repeat the pattern; keep only the first output
    output = re.split(r"\n\s*(?:Output|Input|Instruction):", output)[0]
    if task_input.lower() in ("<noinput>", "none", "n/a", ""):
        task_input = ""
    return task_input, output.strip()


def _instruction_reason(text: str, cfg: Config) -> str | None:
    from polyalign.stages.core.tasks import instruction_problem

    return instruction_problem(text, cfg.min_words, cfg.max_words, cfg.blocklist)


def _alpaca_candidates(cfg: Config, lm: Any, seeds: list[dict], rng: random.Random, round_no: int, journal: Any) -> tuple[list[tuple[str, dict]], list[dict], list[Any]]:
    """One round of Alpaca requests: the parsed tasks in order (id, task), the items that did
    not parse (quarantine rows) and the replies."""
    from polyalign.stages.core.backends import Request, request_seed
    from polyalign.stages.core.backends import run as generate
    from polyalign.stages.core.tasks import alpaca_prompt, alpaca_stop, parse_alpaca

    temperature, top_p = cfg.sampling
    with_instances = [s for s in seeds if s["instances"]]
    shown = min(cfg.shown_seeds, len(with_instances))
    requests, firsts = [], []
    for i in range(cfg.round_size):
        demos = rng.sample(with_instances, shown)
        prompt, first = alpaca_prompt(demos, cfg.tasks_per_request)
        key = f"{round_no:05d}/tasks/{i:03d}"
        requests.append(
            Request(
                key=key,
                prompt=prompt,
                max_new_tokens=cfg.request_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=alpaca_stop(shown, cfg.tasks_per_request),
                seed=request_seed(cfg.seed, key),
            )
        )
        firsts.append(first)
    replies = generate(lm, requests, journal, desc=f"round {round_no}")
    candidates, quarantine = [], []
    for i, (req, first) in enumerate(zip(requests, firsts)):
        reply = replies[req.key]
        for j, (task, raw, problem) in enumerate(parse_alpaca(reply.text, first, reply.truncated and not cfg.keep_truncated)):
            cid = f"si-{round_no:05d}-{i:03d}-{j:02d}"
            if task is None:
                quarantine.append({"id": cid, "reason": problem, "raw": raw})
            else:
                candidates.append((cid, task))
    return candidates, quarantine, list(replies.values())


def _single_candidates(cfg: Config, lm: Any, seed_texts: list[str], machine: list[str], rng: random.Random, round_no: int, journal: Any) -> tuple[list[tuple[str, dict]], list[dict], list[Any]]:
    """One round of one-instruction requests: (id, {"instruction"}) per reply in order, the
    truncated ones as quarantine rows, and the replies."""
    from polyalign.stages.core.backends import Request, request_seed
    from polyalign.stages.core.backends import run as generate

    temperature, top_p = cfg.sampling
    requests = []
    for i in range(cfg.round_size):
        demos = rng.sample(seed_texts, min(cfg.shown_seeds, len(seed_texts)))
        extra = rng.sample(machine, min(cfg.prompt_machine_tasks, len(machine)))
        key = f"{round_no:05d}/instruction/{i:03d}"
        requests.append(
            Request(
                key=key,
                prompt=_instruction_prompt(demos, extra),
                max_new_tokens=cfg.max_instruction_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=("\n", "Task "),
                seed=request_seed(cfg.seed, key),
            )
        )
    replies = generate(lm, requests, journal, desc=f"round {round_no}")
    candidates, quarantine = [], []
    for i, req in enumerate(requests):
        reply = replies[req.key]
        cid = f"si-{round_no:05d}-{i:03d}"
        text = re.sub(r"\s+", " ", reply.text).strip()
        if reply.truncated and not cfg.keep_truncated:
            quarantine.append({"id": cid, "instruction": text, "reason": f"truncated: no end within max_instruction_tokens ({cfg.max_instruction_tokens})"})
        else:
            candidates.append((cid, {"instruction": text}))
    return candidates, quarantine, list(replies.values())


def _single_instances(cfg: Config, lm: Any, seeds: list[dict], survivors: list[tuple[str, dict]], round_no: int, journal: Any) -> tuple[list[tuple[str, dict]], list[dict], list[Any]]:
    """The teacher writes one instance per surviving instruction (single method)."""
    from polyalign.stages.core.backends import Request
    from polyalign.stages.core.backends import run as generate

    shots_rng = random.Random(f"{cfg.seed}-{round_no}-shots")
    with_inst = [s for s in seeds if s["instances"]]
    requests = []
    for cid, task in survivors:
        shots = shots_rng.sample(with_inst, min(cfg.instance_shots, len(with_inst)))
        requests.append(
            Request(
                key=f"{round_no:05d}/instance/{cid}",
                prompt=_instance_prompt(shots, task["instruction"], cfg.instance_format),
                max_new_tokens=cfg.instance_tokens,
                stop=("\n\nInstruction:", "Instruction:"),
            )
        )
    replies = generate(lm, requests, journal, desc="instances")
    done, quarantine = [], []
    for (cid, task), req in zip(survivors, requests):
        reply = replies[req.key]
        text = task["instruction"]
        parsed = _parse_instance(reply.text, cfg.instance_format)
        if reply.truncated and not cfg.keep_truncated:
            quarantine.append({"id": cid, "instruction": text, "reason": f"instance truncated at max_instance_tokens ({cfg.instance_tokens})", "raw": reply.text})
        elif parsed is None:
            quarantine.append({"id": cid, "instruction": text, "reason": "instance has no 'Output:' field", "raw": reply.text})
        else:
            done.append((cid, {"instruction": text, "input": parsed[0], "output": parsed[1]}))
    return done, quarantine, list(replies.values())


def _si_candidates(cfg: Config, lm: Any, seed_texts: list[str], machine: list[str], rng: random.Random, round_no: int, journal: Any) -> tuple[list[tuple[str, dict]], list[dict], list[Any]]:
    """One round of Self-Instruct list requests: 8 in-context instructions each (machine ones
    as available, seeds for the rest), the model continues the numbered list."""
    from polyalign.stages.core.backends import Request, request_seed
    from polyalign.stages.core.backends import run as generate
    from polyalign.stages.core.tasks import parse_si_list, si_list_prompt, si_list_stop

    temperature, top_p = cfg.sampling
    total = cfg.shown_seeds + cfg.prompt_machine_tasks
    requests = []
    for i in range(cfg.round_size):
        extra = rng.sample(machine, min(cfg.prompt_machine_tasks, len(machine)))
        demos = rng.sample(seed_texts, min(total - len(extra), len(seed_texts))) + extra
        prompt, _ = si_list_prompt(demos)
        key = f"{round_no:05d}/list/{i:03d}"
        requests.append(
            Request(key=key, prompt=prompt, max_new_tokens=cfg.request_tokens, temperature=temperature, top_p=top_p, stop=si_list_stop(), seed=request_seed(cfg.seed, key))
        )
    replies = generate(lm, requests, journal, desc=f"round {round_no}")
    candidates, quarantine = [], []
    for i, req in enumerate(requests):
        reply = replies[req.key]
        for j, (text, raw, problem) in enumerate(parse_si_list(reply.text, reply.truncated and not cfg.keep_truncated)):
            cid = f"si-{round_no:05d}-{i:03d}-{j:02d}"
            if text is None:
                quarantine.append({"id": cid, "reason": problem, "raw": raw})
            else:
                candidates.append((cid, {"instruction": text}))
    return candidates, quarantine, list(replies.values())


def _si_instances(cfg: Config, lm: Any, seeds: list[dict], survivors: list[tuple[str, dict]], round_no: int, journal: Any) -> tuple[list[tuple[str, dict]], list[dict], list[Any], dict[str, int]]:
    """Self-Instruct's second half for the instructions kept: is each a classification task
    (few-shot, greedy)? Then instances: output-first for classification, input-first
    otherwise; the instance filters; the first valid instance makes the record."""
    from polyalign.stages.core.backends import Request
    from polyalign.stages.core.backends import run as generate
    from polyalign.stages.core.tasks import (
        INSTANCE_STOP,
        clf_prompt,
        conflicting_inputs,
        instance_problem,
        instance_prompt,
        parse_clf,
        parse_instances,
    )

    rng = random.Random(f"{cfg.seed}-{round_no}-shots")
    labelled = [s for s in seeds if "is_classification" in s]
    yes = [s for s in labelled if s["is_classification"]]
    no = [s for s in labelled if not s["is_classification"]]
    half = cfg.classification_shots // 2
    clf_requests = []
    for cid, task in survivors:
        shots = rng.sample(yes, min(half, len(yes))) + rng.sample(no, min(half, len(no)))
        rng.shuffle(shots)
        clf_requests.append(Request(key=f"{round_no:05d}/classification/{cid}", prompt=clf_prompt(shots, task["instruction"]), max_new_tokens=3, stop=("\n", "Task")))
    clf = generate(lm, clf_requests, journal, desc="classification") if labelled else {}
    counts = {"classification": 0, "generation": 0, "classification_unclear": 0}
    kinds = []
    for req in clf_requests:
        verdict = parse_clf(clf[req.key].text) if req.key in clf else None
        counts["classification_unclear"] += verdict is None
        kinds.append(bool(verdict))
        counts["classification" if verdict else "generation"] += 1
    with_inst = [s for s in seeds if s["instances"]]
    inst_requests = []
    for (cid, task), is_clf in zip(survivors, kinds):
        same_kind = [s for s in with_inst if bool(s.get("is_classification")) == is_clf] or with_inst
        shots = rng.sample(same_kind, min(cfg.instance_shots, len(same_kind)))
        inst_requests.append(
            Request(key=f"{round_no:05d}/instances/{cid}", prompt=instance_prompt(shots, task["instruction"], is_clf), max_new_tokens=cfg.instance_tokens, stop=INSTANCE_STOP)
        )
    replies = generate(lm, inst_requests, journal, desc="instances")
    done, quarantine = [], []
    for (cid, task), is_clf, req in zip(survivors, kinds, inst_requests):
        reply = replies[req.key]
        pairs, _ = parse_instances(reply.text, is_clf, reply.truncated and not cfg.keep_truncated)
        valid = [(a, b) for a, b in pairs if instance_problem(a, b) is None]
        base = {"id": cid, "instruction": task["instruction"], "is_classification": is_clf, "raw": reply.text}
        if conflicting_inputs(valid):
            quarantine.append({**base, "reason": "one input with different outputs"})
        elif not valid:
            problems = sorted({instance_problem(a, b) or "" for a, b in pairs})
            quarantine.append({**base, "reason": "no valid instance" + (f" ({', '.join(problems)})" if problems else ": none parsed")})
        else:
            done.append((cid, {"instruction": task["instruction"], "input": valid[0][0], "output": valid[0][1], "is_classification": is_clf, "instances": len(set(valid))}))
    return done, quarantine, list(clf.values()) + list(replies.values()), counts


def run(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    from collections import Counter

    from polyalign.stages.core.backends import usage_of
    from polyalign.stages.core.cards import render_card
    from polyalign.stages.core.io import stable_unit
    from polyalign.stages.core.novelty import NoveltyFilter, rouge_tokens
    from polyalign.stages.core.progress import bar as progress_bar
    from polyalign.stages.core.tasks import instance_problem

    seeds = load_seed_tasks(cfg.seed_tasks)
    seed_texts = [s["instruction"].strip() for s in seeds]
    if cfg.method == "alpaca" and not any(s["instances"] for s in seeds):
        raise RuntimeError(f"self_instruct: method alpaca shows seed tasks with an instance, and {cfg.seed_tasks} has none")
    # the novelty pool: seeds and every kept instruction (exact ROUGE-L decisions, indexed)
    seed_tokens = [rouge_tokens(t) for t in seed_texts]
    frequencies = Counter(w for toks in seed_tokens for w in set(toks))
    pool = NoveltyFilter(cfg.max_rouge_l, frequencies)
    pool_texts = list(seed_texts)
    for toks in seed_tokens:
        pool.add(toks)

    # resume: replay finished rounds to rebuild the pool exactly
    kept: list[dict] = []
    n_quarantined = 0
    task_kinds: dict[str, int] = {}
    usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    round_no = 0
    while out.exists(f"rounds/{round_no:05d}.json"):
        meta = out.read_json(f"rounds/{round_no:05d}.json", keys=("kept", "quarantined", "tokens"))
        shard = out.records(f"data/{round_no:05d}.jsonl", keys=("id", "instruction", "split"))
        kept.extend(shard)
        for r in shard:
            pool.add(rouge_tokens(r["instruction"]))
            pool_texts.append(r["instruction"])
        n_quarantined += meta["quarantined"]
        for k, v in meta.get("task_kinds", {}).items():
            task_kinds[k] = task_kinds.get(k, 0) + int(v)
        for k in usage:
            usage[k] += int(meta.get("usage", {}).get(k, 0))
        round_no += 1
    if round_no:
        print(f"[self_instruct] resuming at round {round_no} with {len(kept)} instructions kept")

    with inputs.backend(cfg.teacher, batch_size=cfg.batch_size, progress=False) as lm:
        bar = progress_bar(total=cfg.num_instructions, initial=min(len(kept), cfg.num_instructions), desc="self_instruct", unit="instr")
        while len(kept) < cfg.num_instructions and round_no < cfg.max_rounds:
            rng = random.Random(f"{cfg.seed}-{round_no}")
            # every reply of this round is journaled as it arrives: a killed run asks again
            # only for what it does not have, even in the middle of a round
            journal = out.journal(f"self_instruct/{round_no:05d}")
            machine = [r["instruction"] for r in kept]
            if cfg.method == "alpaca":
                candidates, quarantine, replies = _alpaca_candidates(cfg, lm, seeds, rng, round_no, journal)
            elif cfg.method == "self_instruct":
                candidates, quarantine, replies = _si_candidates(cfg, lm, seed_texts, machine, rng, round_no, journal)
            else:
                candidates, quarantine, replies = _single_candidates(cfg, lm, seed_texts, machine, rng, round_no, journal)

            survivors = []
            round_kinds: dict[str, int] = {}  # self_instruct: classification or generation tasks
            this_round = NoveltyFilter(cfg.max_rouge_l, frequencies)  # candidates kept so far this round
            round_texts: list[str] = []
            for cid, task in candidates:
                text = task["instruction"]
                reason = _instruction_reason(text, cfg)
                if reason is None and "output" in task:
                    reason = instance_problem(task["input"], task["output"])
                match = None
                if reason is None:
                    cand_tokens = rouge_tokens(text)
                    in_pool, in_round = pool.best_match(cand_tokens), this_round.best_match(cand_tokens)
                    if in_pool is not None and (in_round is None or in_pool[1] >= in_round[1]):
                        match = (pool_texts[in_pool[0]], in_pool[1])
                    elif in_round is not None:
                        match = (round_texts[in_round[0]], in_round[1])
                    if match is not None:
                        reason = f"ROUGE-L {match[1]:.2f} > {cfg.max_rouge_l} to an existing instruction"
                    else:
                        this_round.add(cand_tokens)
                        round_texts.append(text)
                if reason:
                    quarantine.append({"id": cid, **task, "reason": reason, **({"match": match[0]} if match else {})})
                else:
                    survivors.append((cid, task))

            # keep only as many survivors as the target still needs (for single, before the
            # instances are written: they are the expensive part)
            need = cfg.num_instructions - len(kept)
            for cid, task in survivors[need:]:
                quarantine.append({"id": cid, **task, "reason": "surplus: target already reached"})
            survivors = survivors[:need]
            if cfg.method == "self_instruct":
                survivors, lost, more, kinds = _si_instances(cfg, lm, seeds, survivors, round_no, journal)
                quarantine += lost
                replies += more
                round_kinds = kinds
            if cfg.method == "single":
                survivors, lost, more = _single_instances(cfg, lm, seeds, survivors, round_no, journal)
                quarantine += lost
                replies += more
                with_instance = []
                for cid, task in survivors:
                    problem = instance_problem(task["input"], task["output"])
                    if problem:
                        quarantine.append({"id": cid, **task, "reason": problem})
                    else:
                        with_instance.append((cid, task))
                survivors = with_instance
            records = [
                {
                    "id": cid,
                    "instruction": task["instruction"],
                    "input": task["input"],
                    "output": task["output"],
                    "lang": "en",
                    "split": "heldout" if stable_unit(cid) < cfg.heldout_fraction else "train",
                    "source": "self_instruct",
                    **({"is_classification": task["is_classification"]} if "is_classification" in task else {}),
                }
                for cid, task in survivors
            ]
            for rec in records:
                pool.add(rouge_tokens(rec["instruction"]))
                pool_texts.append(rec["instruction"])
            out.write_jsonl(f"quarantine/{round_no:05d}.jsonl", quarantine)
            out.write_jsonl(f"data/{round_no:05d}.jsonl", records)
            round_usage = usage_of(replies)
            tokens = round_usage["prompt_tokens"] + round_usage["completion_tokens"]
            # the round marker is written last: its presence means the round is complete
            out.write_json(
                f"rounds/{round_no:05d}.json",
                {"kept": len(records), "quarantined": len(quarantine), "tokens": tokens, "usage": round_usage, "task_kinds": round_kinds},
            )
            journal.remove()
            kept.extend(records)
            n_quarantined += len(quarantine)
            for k, v in round_kinds.items():
                task_kinds[k] = task_kinds.get(k, 0) + v
            for k in usage:
                usage[k] += round_usage[k]
            bar.update(min(len(records), max(0, cfg.num_instructions - bar.n)))
            round_no += 1
        bar.close()
        backend_usage = lm.usage

    if not kept:
        raise RuntimeError(
            f"self_instruct kept no instruction after {round_no} rounds ({n_quarantined} quarantined); "
            "see quarantine/ in the partial artifact for the reasons"
        )
    reasons: dict[str, int] = {}
    for row in out.records("quarantine/*.jsonl", keys=("reason",)):
        key = row["reason"].split(" ")[0] if row["reason"].startswith("ROUGE") else row["reason"]
        reasons[key] = reasons.get(key, 0) + 1
    splits = {s: sum(r["split"] == s for r in kept) for s in ("train", "heldout")}
    out.metrics.update(
        tokens=usage["prompt_tokens"] + usage["completion_tokens"],
        usage={cfg.teacher: inputs.priced(cfg.teacher, usage)},
        retries=backend_usage.retries,
        retry_causes=backend_usage.retry_causes,
        records=len(kept),
        quarantined=n_quarantined,
        rounds=round_no,
        quarantine_reasons=reasons,
        **({"task_kinds": task_kinds} if task_kinds else {}),
        **{f"records_{k}": v for k, v in splits.items()},
    )
    out.summary = (
        f"Self-Instruct kept {len(kept)} instructions ({splits['train']} train, "
        f"{splits['heldout']} held out) from {round_no} rounds; {n_quarantined} candidates quarantined."
    )
    out.card = render_card(
        pretty_name="polyalign self-instruct data",
        description="English instruction-following tasks written by a teacher model from seed tasks.",
        stage="self_instruct",
        stage_version=VERSION,
        fingerprint=out.fingerprint,
        languages=["en"],
        counts={"kept": len(kept), "quarantined": n_quarantined, **splits},
        total=len(kept),
        models=out.models,
        provenance=[f"seed tasks: {cfg.seed_tasks}", f"{round_no} generation rounds of {cfg.round_size} requests, seed {cfg.seed}"],
        filters=[
            f"method: {cfg.method}" + (f" ({cfg.shown_seeds} seed tasks shown, {cfg.tasks_per_request} new tasks asked per request)" if cfg.method == "alpaca" else ""),
            f"instruction length {cfg.min_words}-{cfg.max_words} words",
            f"blocked words (whole words, any case): {', '.join(cfg.blocklist)}",
            "instructions starting with 'Write a program', with punctuation or with a non-ASCII character",
            "instances with an empty output or an input equal to the output",
            f"ROUGE-L novelty: dropped when > {cfg.max_rouge_l} against the seeds or a kept instruction",
        ]
        + [f"quarantined for '{k}': {v}" for k, v in sorted(reasons.items())],
        samples=kept[:3],
    )
