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
    """Expected rating of each (instruction, response); `judge` is a `generation.LocalLM`."""
    requests: list[tuple[str, str]] = []
    for instruction, response in items:
        ctx = judge.chat_prompt(JUDGE_TEMPLATE.format(language=language, instruction=instruction, response=response))
        requests.extend((ctx, str(d)) for d in RATINGS)
    lls = [ll for ll, _ in judge.loglikelihood(requests)]
    n = len(RATINGS)
    return [expected_rating(lls[n * k : n * k + n]) for k in range(len(items))]
