"""The ROUGE-L novelty filter makes the reference loop's decisions (rouge-score, pairwise),
and `polyalign dedup` applies it to files."""

from __future__ import annotations

import json
import random

import pytest

from polyalign.stages.core.novelty import NoveltyFilter, novelty_filter, rouge_tokens
from tests.conftest import cli
from tests.rouge_reference import near_duplicate, reference


SMALL = "write a the of to and list explain why how story poem about cat dog sea city code sort numbers in python table summary".split()


def synthetic(n: int, seed: int, words: list[str] = SMALL) -> list[str]:
    """Instructions with many near-duplicates, repeated words, punctuation, case changes,
    empty and non-ASCII ones: the cases where bounds go wrong (a small vocabulary by default,
    so most pairs share words)."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        roll = rng.random()
        if out and roll < 0.45:  # edit an earlier one a little
            text = near_duplicate(rng, rng.choice(out), words, rng.randint(1, 3))
        elif roll < 0.5:
            text = rng.choice(["!!!", "", "¿Qué?", "Ünïcödé wörds", "A", "a a a a a a"])
        else:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))
        if rng.random() < 0.2:
            text = text.upper() + rng.choice([".", "?", " -- ok", ""])
        out.append(text)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decisions_equal_the_reference_loop(seed):
    texts = synthetic(260, seed)
    pool, candidates = texts[:20], texts[20:]
    ours = novelty_filter(candidates, pool)
    ref = reference(candidates, pool)
    assert [d is None for d in ours] == [d is None for d in ref]
    assert ours == ref  # the same best match and the same float score
    assert 0.2 < sum(d is None for d in ours) / len(ours) < 0.9  # both outcomes are common


@pytest.mark.parametrize("threshold", [0.2, 0.35, 0.5, 0.7, 0.9, 1.0])
def test_other_thresholds_and_exact_boundaries(threshold):
    # 10 tokens vs 10 tokens sharing 7 in order: F1 is 0.7 (up to rounding): the boundary
    base = "one two three four five six seven eight nine ten"
    variants = [
        "one two three four five six seven x y z",
        "one two three four five six seven eight x y",
        "one two three four five six seven eight nine x",
        "one two three four five x y z w v",
        "ten nine eight seven six five four three two one",
    ]
    texts = synthetic(120, 7) + variants
    assert novelty_filter(texts, [base], threshold) == reference(texts, [base], threshold)


def test_pool_entries_are_not_filtered_and_empty_sequences_never_match():
    filt = NoveltyFilter()
    filt.add(rouge_tokens("Write a poem about the sea"))
    filt.add(rouge_tokens("Write a poem about the sea"))  # seeds may repeat
    assert len(filt) == 2
    assert filt.offer(rouge_tokens("!!! ???")) is None  # no tokens: kept
    assert filt.offer(rouge_tokens("Écrire")) is None  # rouge's tokenizer keeps only a-z0-9
    match = filt.offer(rouge_tokens("Write a poem about the sea!"))
    assert match == (0, 1.0)  # a tie: the first in pool order
    assert len(filt) == 4


def test_most_pairs_are_never_scored():
    """With a vocabulary like that of real instructions (a few common words, many rare ones),
    a candidate meets only the entries that share its rarer words."""
    from collections import Counter

    rng = random.Random(4)
    common = SMALL[:8]
    rare = ["".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(3)) for _ in range(3000)]
    texts = synthetic(1500, 3, words=common * 40 + rare)
    pool, candidates = texts[:100], texts[100:]
    tokens = [rouge_tokens(t) for t in pool + candidates]
    freq: Counter[str] = Counter(w for t in tokens for w in set(t))
    filt = NoveltyFilter(frequencies=freq)
    for t in tokens[:100]:
        filt.add(t)
    pairs = 0
    for t in tokens[100:]:
        pairs += len(filt)
        filt.offer(t)
    assert filt.scored < pairs / 20
    assert novelty_filter(candidates[:300], pool) == reference(candidates[:300], pool)


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_dedup_command_keeps_lines_unchanged_and_explains_drops(tmp_path):
    seeds = _jsonl(tmp_path / "seeds.jsonl", [{"instruction": "Write a poem about the sea."}])
    pool_rows = [
        '{"instruction": "Write a short story about a cat.", "extra":   [1, 2]}',
        {"instruction": "Write a poem about the sea!", "id": 7},
        "",
        {"instruction": "Write a short story about a cat", "id": 9},
        {"instruction": "Explain how sorting works.", "output": "ünïcödé"},
    ]
    pool = _jsonl(tmp_path / "pool.jsonl", pool_rows)
    out, dropped = tmp_path / "kept.jsonl", tmp_path / "dropped.jsonl"
    proc = cli("dedup", pool, "--out", str(out), "--against", seeds, "--dropped", str(dropped))
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "pool.jsonl").read_text(encoding="utf-8").splitlines()
    assert out.read_text(encoding="utf-8").splitlines() == [lines[0], lines[4]]
    gone = [json.loads(x) for x in dropped.read_text(encoding="utf-8").splitlines()]
    assert [g["line"] for g in gone] == [2, 4]
    assert gone[0]["match"] == {"file": seeds, "line": 1, "instruction": "Write a poem about the sea."} and gone[0]["rouge_l"] == 1.0
    assert gone[1]["match"]["file"] == pool and gone[1]["match"]["line"] == 1 and gone[1]["record"]["id"] == 9
    assert "kept 2 of 4" in proc.stdout


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"instruction": "ok"', "pool.jsonl:2: not valid JSON"),
        ('["instruction"]', "pool.jsonl:2: expected a JSON object with an 'instruction' string"),
        ('{"instruction": 3}', "pool.jsonl:2: expected a JSON object with an 'instruction' string"),
    ],
)
def test_dedup_command_names_the_bad_line(tmp_path, line, expected):
    pool = _jsonl(tmp_path / "pool.jsonl", [{"instruction": "fine"}, line])
    out = tmp_path / "kept.jsonl"
    proc = cli("dedup", pool, "--out", str(out))
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not out.exists()


def test_dedup_command_refuses_a_bad_threshold_and_a_missing_file(tmp_path):
    pool = _jsonl(tmp_path / "pool.jsonl", [{"instruction": "fine"}])
    bad = cli("dedup", pool, "--out", str(tmp_path / "k.jsonl"), "--threshold", "1.5")
    assert bad.returncode == 2 and "--threshold" in bad.stderr and "Traceback" not in bad.stderr
    missing = cli("dedup", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "k.jsonl"))
    assert missing.returncode == 2 and "nope.jsonl: no such file" in missing.stderr
