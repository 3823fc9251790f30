"""The ROUGE-L novelty filter of Self-Instruct, exact and fast.

The rule (Wang et al., 2022; Alpaca kept it): instructions are tokenized with rouge-score's
default tokenizer, no stemmer; candidates are taken in order, and one is dropped when its
ROUGE-L F1 against any instruction already in the pool (the seeds, then every candidate kept
so far) is above the threshold (0.7); a kept candidate joins the pool. Scoring every pair, as
the reference loop does, is quadratic: hours at 10K candidates, days at Okapi's 158K.

`NoveltyFilter` makes the same decisions without scoring most pairs:

- ROUGE-L F1 of token sequences of lengths m and n with a longest common subsequence L is
  2L / (m + n) (rouge-score computes it as 2PR / (P + R) with P = L/m, R = L/n; the final
  comparison uses that same formula, so float rounding decides alike). L is at most the
  multiset overlap of the two sequences and at most min(m, n). So a pair can pass the
  threshold t only if n lies within m * t / (2 - t) and m * (2 - t) / t, and the overlap is
  more than m * t / (2 - t) (and the same with n).
- Each sequence is a set of (token, occurrence) elements sorted rarest first by a fixed
  global order. Two sets that share at least k >= 2 elements share their two smallest common
  elements, and both lie among the first |x| - k + 2 of each (the 2-prefix: the second
  common element has at most |x| - k others before it). So every pair of elements of that
  prefix is a key of the index, and a candidate meets only pool entries with which it shares
  two of its rarer tokens, not one: with a vocabulary of V words a pool of n entries shares a
  given word with about n/V of them, but a given pair with about n/V^2, which keeps the work
  per candidate nearly flat as the pool grows. A sequence so short (or a threshold so low)
  that one shared element may pass is also indexed, and looks up, element by element.
- The pairs left are scored exactly by rapidfuzz's Indel distance (m + n - 2L, compiled,
  bit-parallel) on the sequences encoded one character per token; only pairs whose distance
  can still pass are scored.

`best_match` returns the pool entry with the highest score above the threshold (the first in
pool order on a tie, as a max over the reference loop's scores does), or None.
"""

from __future__ import annotations

import math
from collections import Counter
from operator import itemgetter
from collections.abc import Iterable, Sequence

THRESHOLD = 0.7
_EPS = 1e-9
_KNOWN = 1 << 40  # ranks of tokens given in `frequencies` start here
_OCCURRENCES = 1 << 20  # an element packs (rank, occurrence) as rank * this + occurrence
_SURROGATES = 0xE000 - 0xD800


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenization without a stemmer (its public tokenizer class)."""
    return _tokenizer().tokenize(text)


_TOKENIZER = None


def _tokenizer():  # type: ignore[no-untyped-def]
    global _TOKENIZER
    if _TOKENIZER is None:
        from rouge_score.tokenizers import DefaultTokenizer

        _TOKENIZER = DefaultTokenizer(use_stemmer=False)
    return _TOKENIZER


def rouge_l_f1(lcs: int, n_prediction: int, n_target: int) -> float:
    """ROUGE-L F1 from the LCS length, computed as rouge-score computes it."""
    if not n_prediction or not n_target:
        return 0.0
    precision = lcs / n_prediction
    recall = lcs / n_target
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


class NoveltyFilter:
    """A pool of instructions (as rouge tokens) and the near-duplicate test against it.

    `frequencies` (token -> count, e.g. over everything that will be offered) orders tokens
    rarest first; tokens it does not know count as rarest. Any fixed order gives the same
    decisions; a good one only makes them faster.
    """

    def __init__(self, threshold: float = THRESHOLD, frequencies: Counter[str] | None = None):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        # the global order, rarest first: tokens `frequencies` knows rank after all others
        known = sorted((frequencies or {}).items(), key=lambda kv: (kv[1], kv[0]))
        self.rank: dict[str, int] = {tok: _KNOWN + i for i, (tok, _) in enumerate(known)}
        self.unknown = 0
        self.ids: dict[str, int] = {}  # token -> id (its character in the encoded strings)
        self.lengths: list[int] = []  # pool entry -> number of tokens
        self.encoded: list[str] = []  # pool entry -> tokens, one character each
        self.postings: dict[int, list[int]] = {}  # pair of prefix elements -> pool entries
        self.dense: dict[int, int] = {}  # element -> small id (pair keys pack two of them)
        self.singles: dict[int, list[int]] = {}  # one-token entries by their element
        self.scored = 0  # pairs met by the prefix filter and handed to the exact scorer

    def __len__(self) -> int:
        return len(self.lengths)

    # -- bounds -------------------------------------------------------------------------------

    def _min_overlap(self, m: int) -> int:
        """The least overlap a sequence of m tokens must have with any sequence it can exceed
        the threshold against (conservative by one at exact boundaries)."""
        t = self.threshold
        return max(1, math.floor(m * t / (2 - t) - _EPS) + 1)

    def _length_range(self, m: int) -> tuple[float, float]:
        t = self.threshold
        return m * t / (2 - t) - _EPS, m * (2 - t) / t + _EPS

    def _prefix(self, tokens: Sequence[str]) -> list[int]:
        """The first elements of the token multiset in the global order; an element is
        (token rank, occurrence) packed into one int."""
        seen: dict[str, int] = {}
        elements = []
        for tok in tokens:
            r = self.rank.get(tok)
            if r is None:  # first seen now: rarer than every known token, fixed from now on
                r = self.rank[tok] = self.unknown
                self.unknown += 1
            k = seen.get(tok, 0)
            seen[tok] = k + 1
            elements.append(r * _OCCURRENCES + k)
        elements.sort()
        return elements[: len(tokens) - self._min_overlap(len(tokens)) + 2]  # the 2-prefix

    def _keys(self, prefix: list[int]) -> list[int]:
        """Every pair of prefix elements (smaller first), packed into one int."""
        dense = self.dense
        ids = []
        for element in prefix:
            d = dense.get(element)
            if d is None:
                d = dense[element] = len(dense)
            ids.append(d)
        return [(a << 32) | b for k, a in enumerate(ids) for b in ids[k + 1 :]]

    def _encode(self, tokens: Sequence[str]) -> str:
        chars = []
        for tok in tokens:
            i = self.ids.get(tok)
            if i is None:
                i = self.ids[tok] = len(self.ids)
            code = i + 1 if i + 1 < 0xD800 else i + 1 + _SURROGATES  # no surrogate code points
            if code > 0x10FFFF:
                raise ValueError("more distinct tokens than Unicode code points")
            chars.append(chr(code))
        return "".join(chars)

    # -- pool ---------------------------------------------------------------------------------

    def add(self, tokens: Sequence[str]) -> int:
        """Put an entry into the pool whatever it matches (a seed); returns its index."""
        index = len(self.lengths)
        self.lengths.append(len(tokens))
        self.encoded.append(self._encode(tokens))
        if not tokens:  # an empty sequence scores 0 against everything: never a match
            return index
        prefix = self._prefix(tokens)
        for key in self._keys(prefix):
            self.postings.setdefault(key, []).append(index)
        if self._min_overlap(len(tokens)) == 1:  # may pass sharing one element: index each
            for element in prefix:
                self.singles.setdefault(element, []).append(index)
        return index

    def best_match(self, tokens: Sequence[str]) -> tuple[int, float] | None:
        """(pool index, ROUGE-L F1) of the best entry above the threshold, or None."""
        from rapidfuzz import process
        from rapidfuzz.distance import Indel

        m = len(tokens)
        if not m:
            return None
        found: set[int] = set()
        prefix = self._prefix(tokens)
        postings = self.postings
        for key in self._keys(prefix):
            hits = postings.get(key)
            if hits:
                found.update(hits)
        if self._min_overlap(m) == 1:  # a partner that shares one element may pass
            singles = self.singles
            for element in prefix:
                hits = singles.get(element)
                if hits:
                    found.update(hits)
        if not found:
            return None
        near = list(found)
        self.scored += len(near)
        t = self.threshold
        hi = self._length_range(m)[1]
        # Indel distance = m + n - 2L and F1 = 2L / (m + n) > t need distance < (m + n)(1 - t);
        # with n at most `hi`, a larger distance can never pass (rapidfuzz skips those pairs,
        # and those whose lengths alone rule them out, in compiled code)
        cutoff = math.floor((m + hi) * (1 - t) + _EPS) + 1
        choices = [self.encoded[near[0]]] if len(near) == 1 else itemgetter(*near)(self.encoded)
        best: tuple[int, float] | None = None
        lengths = self.lengths
        for _, dist, k in process.extract(self._encode(tokens), choices, scorer=Indel.distance, score_cutoff=cutoff, limit=None):
            j = near[k]
            n = lengths[j]
            score = rouge_l_f1((m + n - int(dist)) // 2, m, n)
            if score > t and (best is None or score > best[1] or (score == best[1] and j < best[0])):
                best = (j, score)
        return best

    def offer(self, tokens: Sequence[str]) -> tuple[int, float] | None:
        """The reference loop's step: None and the entry joins the pool when it is novel,
        else its best match (and the pool is unchanged)."""
        match = self.best_match(tokens)
        if match is None:
            self.add(tokens)
        return match


def novelty_filter(
    candidates: Sequence[str], pool: Iterable[str] = (), threshold: float = THRESHOLD, progress: bool = False
) -> list[tuple[int, float] | None]:
    """Decide each candidate in order against `pool` (kept as is) and the candidates kept
    before it. Returns per candidate None (kept) or (index of its best match, score); indices
    count the pool first, then the candidates."""
    from tqdm.auto import tqdm

    pool_tokens = [rouge_tokens(p) for p in pool]
    cand_tokens = [rouge_tokens(c) for c in candidates]
    freq: Counter[str] = Counter()
    for toks in pool_tokens + cand_tokens:
        freq.update(set(toks))
    filt = NoveltyFilter(threshold, freq)
    entry_of: list[int] = []  # filter index -> index in pool + candidates
    for i, toks in enumerate(pool_tokens):
        filt.add(toks)
        entry_of.append(i)
    decisions: list[tuple[int, float] | None] = []
    for i, toks in enumerate(tqdm(cand_tokens, desc="novelty", unit="instr", disable=not progress)):
        match = filt.offer(toks)
        if match is None:
            entry_of.append(len(pool_tokens) + i)
            decisions.append(None)
        else:
            decisions.append((entry_of[match[0]], match[1]))
    return decisions


# -- files: `polyalign dedup` -------------------------------------------------------------


def read_instructions(path: str) -> list[tuple[int, str, str]]:
    """(line number, the line as written, its instruction) for each non-blank line of a JSONL
    file; a line that is not a JSON object with an `instruction` string is a one-line error
    naming the file and line."""
    import json

    from polyalign.stages.core.errors import UserError

    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                text = line.rstrip("\r\n")
                if not text.strip():
                    continue
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str):
                    raise UserError(f"{path}:{n}: expected a JSON object with an 'instruction' string")
                rows.append((n, text, rec["instruction"]))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a JSONL file") from None
    return rows


def dedup_files(pool: str, out: str, against: str | None = None, threshold: float = THRESHOLD, dropped: str | None = None, progress: bool = True) -> dict[str, int]:
    """Keep the lines of `pool` whose instruction is novel against `against` and the lines
    kept before them; write them unchanged, in order, to `out`, and the others with their
    best match and score to `dropped`. Outputs are written whole or not at all."""
    import json
    import os
    import tempfile

    from polyalign.stages.core.errors import UserError

    if not 0 < threshold <= 1:
        raise UserError(f"--threshold: must be in (0, 1], got {threshold}")
    seeds = read_instructions(against) if against else []
    rows = read_instructions(pool)
    decisions = novelty_filter([r[2] for r in rows], [s[2] for s in seeds], threshold, progress=progress)
    sources = [(against, n, text) for n, _, text in seeds] + [(pool, n, text) for n, _, text in rows]

    def write(path: str, lines: Iterable[str]) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".dedup-", suffix=".tmp")
        except OSError as exc:
            raise UserError(f"{path}: cannot write there ({exc.strerror})") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for line in lines:
                    f.write(line + "\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    write(out, (text for (_, text, _), d in zip(rows, decisions) if d is None))
    if dropped:
        out_rows = []
        for (n, text, _), d in zip(rows, decisions):
            if d is not None:
                src, line, instruction = sources[d[0]]
                out_rows.append(json.dumps({"line": n, "rouge_l": round(d[1], 6), "match": {"file": src, "line": line, "instruction": instruction}, "record": json.loads(text)}, ensure_ascii=False))
        write(dropped, out_rows)
    kept = sum(d is None for d in decisions)
    return {"pool": len(rows), "against": len(seeds), "kept": kept, "dropped": len(rows) - kept}
