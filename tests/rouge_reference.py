"""The novelty loop as the Self-Instruct code runs it: the reference that
`polyalign.stages.core.novelty` must agree with (tests) and is timed against (bench).

Each instruction is tokenized once by rouge-score's tokenizer (no stemmer); each candidate is
scored with rouge-score's LCS F1 against every instruction kept so far, in order, and is
dropped when the best score is above the threshold. rouge-score's internals are called here
as the Self-Instruct code calls them; polyalign itself uses only its public tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence


def reference(candidates: Sequence[str], pool: Sequence[str], threshold: float = 0.7, budget: float = float("inf")) -> list[tuple[int, float] | None]:
    """Per candidate None (kept) or (index of the best match, its score), indices counting
    `pool` first, then the candidates. Stops after `budget` seconds: the decisions returned
    are those of the first candidates (each depends only on the ones before it)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    start = time.perf_counter()
    tokenize = scorer._tokenizer.tokenize  # noqa: SLF001
    kept = [tokenize(t) for t in pool]
    index = list(range(len(pool)))
    out: list[tuple[int, float] | None] = []
    for i, cand in enumerate(candidates):
        toks = tokenize(cand)
        scores = [rouge_scorer._score_lcs(k, toks).fmeasure for k in kept]  # noqa: SLF001
        best = max(scores, default=0.0)
        if best > threshold:
            out.append((index[scores.index(best)], best))
        else:
            kept.append(toks)
            index.append(len(pool) + i)
            out.append(None)
        if time.perf_counter() - start > budget:
            break
    return out


def near_duplicate(rng, text: str, words: Sequence[str], edits: int) -> str:  # noqa: ANN001
    """`text` with `edits` random word edits: a replacement, a deletion or an insertion."""
    toks = text.split()
    for _ in range(edits):
        op = rng.random()
        if op < 0.45 and toks:
            toks[rng.randrange(len(toks))] = rng.choice(words)
        elif op < 0.7 and len(toks) > 1:
            del toks[rng.randrange(len(toks))]
        else:
            toks.insert(rng.randrange(len(toks) + 1), rng.choice(words))
    return " ".join(toks)
