"""The LLM judge: how good is a response to an instruction, on a 1-5 scale.

The judge reads the instruction and the response and is asked for one digit. Instead of
parsing its text we take the log-likelihood it gives each digit as the next token and use
the expected rating, which is defined for every response and never fails to parse. Used by
`preferences` (to rank sampled responses) and `evaluate` (win rates against the base model).
"""

from __future__ import annotations

import math
from typing import Any

JUDGE_TEMPLATE = (
    "You are grading a response written by an assistant. The instruction and the response "
    "are in {language}.\n\nInstruction:\n{instruction}\n\nResponse:\n{response}\n\n"
    "How helpful, correct and fluent is the response? Answer with one digit from 1 (useless) "
    "to 5 (excellent)."
)
RATINGS = range(1, 6)


def expected_rating(lls: list[float]) -> float:
    """The mean rating under the softmax of the five digits' log-likelihoods."""
    top = max(lls)
    weights = [math.exp(x - top) for x in lls]
    return sum((i + 1) * w for i, w in enumerate(weights)) / sum(weights)


def rate(judge: Any, language: str, items: list[tuple[str, str]]) -> list[float]:
    """Expected rating of each (instruction, response); `judge` is a backend with
    `loglikelihood` (transformers, or an OpenAI-compatible server that echoes log-probabilities)."""
    requests: list[tuple[str, str]] = []
    for instruction, response in items:
        text = JUDGE_TEMPLATE.format(language=language, instruction=instruction, response=response)
        if hasattr(judge, "chat_prompt"):  # local: the judge's own chat template
            requests.extend((judge.chat_prompt(text), str(d)) for d in RATINGS)
        else:  # an API's completions endpoint: plain text, the digit after "Rating:"
            requests.extend((text + "\n\nRating:", f" {d}") for d in RATINGS)
    lls = [ll for ll, _ in judge.loglikelihood(requests)]
    n = len(RATINGS)
    return [expected_rating(lls[n * k : n * k + n]) for k in range(len(items))]


# ---------------------------------------------------------------------------------------
# The ranking judge (as Okapi ranked with ChatGPT): the k responses are shown together,
# labelled A, B, C... in a per-prompt shuffled order, and the judge answers with a ranking.

RANK_TEMPLATE = (
    "Here is an instruction written in {language}, followed by {k} candidate responses labelled "
    "{labels}.\n\nInstruction:\n{instruction}\n\n{responses}\n\n"
    "Order the responses from best to worst, judging helpfulness, correctness and how fluent "
    "they are in {language}. Reply with a single line such as `Ranking: {example}` that uses "
    "every label exactly once; put `=` between responses of equal quality."
)
LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def rank_prompt(language: str, instruction: str, responses: list[str]) -> str:
    labels = LABELS[: len(responses)]
    shown = "\n\n".join(f"[{labels[i]}]\n{text}" for i, text in enumerate(responses))
    example = " > ".join(reversed(labels)) if len(labels) > 1 else labels
    return RANK_TEMPLATE.format(
        language=language, k=len(responses), labels=", ".join(labels), instruction=instruction, responses=shown, example=example
    )


def parse_ranking(text: str, k: int) -> list[list[int]] | None:
    """Tiers of label indices, best first (`B > A = C` -> [[1], [0, 2]]); None when the reply
    does not name every one of the k labels exactly once."""
    import re

    labels = LABELS[:k]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    marked = [ln.split(":", 1)[1] for ln in lines if re.match(r"\s*\**\s*ranking\s*\**\s*:", ln, re.I)]
    for candidate in marked[-1:] + lines[::-1]:
        body = candidate.upper()
        # labels are single letters standing alone, optionally bracketed: "[B] > A = (C)"
        tokens = re.findall(r"(?<![A-Z])[\[\(]?([A-Z])[\]\)]?(?![A-Z])|(>|=|,|<)", body)
        order: list[list[int]] = []
        seen: set[int] = set()
        tie, reverse, ok = False, False, True
        for letter, sep in tokens:
            if sep:
                tie = sep == "="
                reverse = reverse or sep == "<"
                continue
            if letter not in labels or labels.index(letter) in seen:
                ok = False
                break
            idx = labels.index(letter)
            seen.add(idx)
            if tie and order:
                order[-1].append(idx)
            else:
                order.append([idx])
            tie = False
        if ok and len(seen) == k:
            return order[::-1] if reverse else order
    return None
