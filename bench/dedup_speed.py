"""Novelty filter speed: Self-Instruct's reference loop against polyalign's `novelty_filter`.

    .venv/bin/python bench/dedup_speed.py [--sizes 1000,3000,10000] [--big 30000,100000]
                                          [--ref-budget 900] [--threshold 0.7]

Pools: the 175 Self-Instruct seed tasks are the instructions already kept (`--against`); the
candidates are built from those and the 252 user-oriented instructions (../shared/data/
self_instruct/): the originals, then seeded variants: near-duplicates (a word or two
replaced, inserted or removed), rewrites (each word replaced with probability 0.4 by a word
from the same instructions), splices (the start of one with the end of another) and short
templated tasks. The first N candidates make the pool of size N.

Baseline: the loop as the Self-Instruct code runs it (tests/rouge_reference.py): each
candidate tokenized once by rouge-score's tokenizer (no stemmer) and scored with
rouge-score's LCS against every instruction kept so far; dropped above the threshold. It runs until `--ref-budget` seconds
per size; when it stops early, the decisions are compared on the candidates it finished
(each decision depends only on the ones before it) and the ratio is over those.

Ours: `polyalign.stages.core.novelty.novelty_filter` on the same candidates (tokenizing
included). Prints, per size, both times, the ratio, whether every decision (kept or
dropped, best match, score) is identical, and the growth exponent of our time (a log-log
fit over the sizes from 3K up). Targets: identical decisions, >= 30x at 3K, near-linear
growth, 100K in under 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "self_instruct"


def load(name: str) -> list[str]:
    path = DATA / name
    if not path.exists():
        sys.exit(f"{path} is missing: this benchmark needs ../shared/data/self_instruct/")
    return [json.loads(line)["instruction"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def candidates(material: list[str], n: int, seed: int = 0) -> list[str]:
    from tests.rouge_reference import near_duplicate

    rng = random.Random(seed)
    words = sorted({w for text in material for w in text.split()})
    made = list(material)
    templates = ["{v} a {a} {n} about {t}.", "{v} the {n} of {t}", "{v} {t} in one {n}", "Give an example of a {a} {n}."]
    verbs = ["Write", "Describe", "Explain", "Summarize", "List", "Classify", "Rewrite", "Translate"]
    adjs = ["short", "funny", "formal", "simple", "detailed", "sad", "new", "clear"]
    nouns = ["poem", "story", "email", "list", "summary", "tweet", "letter", "recipe", "plan", "review"]
    while len(made) < n:
        roll = rng.random()
        base = rng.choice(made).split()
        if roll < 0.25:
            text = near_duplicate(rng, " ".join(base), words, rng.randint(1, 2))
        elif roll < 0.65:  # rewrite
            text = " ".join(rng.choice(words) if rng.random() < 0.4 else w for w in base)
        elif roll < 0.9:  # splice
            other = rng.choice(made).split()
            text = " ".join(base[: max(1, len(base) // 2)] + other[len(other) // 2 :])
        else:
            t = " ".join(rng.sample(words, rng.randint(1, 3)))
            text = rng.choice(templates).format(v=rng.choice(verbs), a=rng.choice(adjs), n=rng.choice(nouns), t=t)
        made.append(text)
    return made[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,3000,10000", help="Sizes run by both (the reference capped by --ref-budget).")
    ap.add_argument("--big", default="30000,100000", help="Sizes run by ours only.")
    ap.add_argument("--ref-budget", type=float, default=900.0, help="Seconds the reference may take per size.")
    ap.add_argument("--threshold", type=float, default=0.7)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))  # tests.rouge_reference
    from polyalign.stages.core.novelty import novelty_filter
    from tests.rouge_reference import reference

    seeds = load("seed_tasks.jsonl")
    material = seeds + load("user_oriented_instructions.jsonl")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    big = [int(s) for s in args.big.split(",") if s]
    pool = candidates(material, max(sizes + big))
    print(f"{len(seeds)} seed instructions kept beforehand; candidates from {len(material)} shared instructions and variants; threshold {args.threshold}")
    print("\n| candidates | reference s | ours s | ratio | kept (ours) | identical decisions |")
    print("|---:|---:|---:|---:|---:|---|")
    novelty_filter(pool[:50], seeds, args.threshold)  # warm-up: imports and first calls are not timed
    ours_times: dict[int, float] = {}
    for n in sizes + big:
        cands = pool[:n]
        start = time.perf_counter()
        ours = novelty_filter(cands, seeds, args.threshold)
        ours_s = time.perf_counter() - start
        ours_times[n] = ours_s
        kept = sum(d is None for d in ours)
        if n not in sizes:
            print(f"| {n} | not run | {ours_s:.1f} | | {kept} | |")
            continue
        start = time.perf_counter()
        ref = reference(cands, seeds, args.threshold, args.ref_budget)
        ref_s = time.perf_counter() - start
        done = len(ref)
        if done < n:  # compare on the prefix the reference finished, timing ours on it too
            start = time.perf_counter()
            novelty_filter(cands[:done], seeds, args.threshold)
            part_s = time.perf_counter() - start
            same = ours[:done] == ref
            print(f"| {n} | {ref_s:.1f} (stopped after {done}) | {ours_s:.1f} ({part_s:.2f} for {done}) | {ref_s / part_s:.0f}x on {done} | {kept} | {'yes' if same else 'NO'} ({done} compared) |")
        else:
            same = ours == ref
            print(f"| {n} | {ref_s:.1f} | {ours_s:.2f} | {ref_s / ours_s:.0f}x | {kept} | {'yes' if same else 'NO'} |")
    fit = sorted(n for n in ours_times if n >= 3000)
    if len(fit) >= 2:
        xs = [math.log(n) for n in fit]
        ys = [math.log(ours_times[n]) for n in fit]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        print(f"\ngrowth of our time: n^{slope:.2f} over {fit[0]}..{fit[-1]} candidates")
    if 100000 in ours_times:
        t = ours_times[100000]
        print(f"100K candidates: {t:.0f} s ({'PASS' if t < 600 else 'MISS'} vs 10 minutes)")
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
