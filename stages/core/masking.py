"""Protect what a translator must not touch, and split long fields into paragraphs.

`mask` replaces fenced code blocks, inline code, URLs, e-mail addresses, `{placeholders}` and
numbers with numbered markers `[[1]]`, `[[2]]`, ...; `restore` puts the originals back into the
translation and says why when it cannot: a marker missing, repeated, or one that was never
there (the field is then quarantined, never half-restored). Earlier kinds win where spans
overlap: a URL inside a code block stays part of the block.

`paragraphs` splits a (masked) field at blank lines, so each paragraph is translated on its
own and the field is joined back with its own separators: a multi-paragraph output is
translated whole, not cut at the first blank line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MARKER = re.compile(r"\[\[(\d+)\]\]")
KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("marker-like text", MARKER),  # a source that already holds "[[3]]" keeps it, masked
    ("code block", re.compile(r"```.*?(?:```|\Z)", re.S)),
    ("inline code", re.compile(r"`[^`\n]+`")),
    ("url", re.compile(r"\b(?:https?|ftp)://[^\s<>\"'`\]\)]+[^\s<>\"'`\]\).,;:!?]")),
    ("e-mail", re.compile(r"\b[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+\b")),
    ("placeholder", re.compile(r"\{\{?\s*[A-Za-z_0-9.]*\s*\}?\}")),
    ("number", re.compile(r"(?<![\w.,])[-+]?\d+(?:[.,:]\d+)*%?(?![\w])")),
)


@dataclass(frozen=True)
class Masked:
    text: str  # the field with markers
    originals: tuple[str, ...]  # marker n (1-based) stands for originals[n - 1]
    kinds: tuple[str, ...]


# what a config names -> the kinds of span it masks
GROUPS: dict[str, tuple[str, ...]] = {
    "code": ("code block", "inline code"), "url": ("url",), "email": ("e-mail",),
    "placeholder": ("placeholder",), "number": ("number",),
}


def mask(text: str, groups: Sequence[str] = tuple(GROUPS)) -> Masked:
    """`text` with the spans of the chosen `groups` (all by default) masked; text that already
    looks like a marker is always masked."""
    wanted = {"marker-like text"} | {kind for g in groups for kind in GROUPS[g]}
    taken: list[tuple[int, int, str]] = []
    for kind, pattern in KINDS:
        if kind not in wanted:
            continue
        for m in pattern.finditer(text):
            if m.end() > m.start() and not any(m.start() < e and s < m.end() for s, e, _ in taken):
                taken.append((m.start(), m.end(), kind))
    taken.sort()
    parts, originals, kinds, pos = [], [], [], 0
    for start, end, kind in taken:
        parts.append(text[pos:start])
        originals.append(text[start:end])
        kinds.append(kind)
        parts.append(f"[[{len(originals)}]]")
        pos = end
    parts.append(text[pos:])
    return Masked("".join(parts), tuple(originals), tuple(kinds))


def restore(translated: str, masked: Masked) -> tuple[str | None, str | None]:
    """(restored text, None), or (None, why the markers do not match)."""
    found = [int(n) for n in MARKER.findall(translated)]
    expected = range(1, len(masked.originals) + 1)
    missing = [n for n in expected if n not in found]
    if missing:
        n = missing[0]
        return None, f"masked {masked.kinds[n - 1]} [[{n}]] lost in translation"
    repeated = sorted({n for n in found if found.count(n) > 1})
    if repeated:
        return None, f"masked {masked.kinds[repeated[0] - 1]} [[{repeated[0]}]] repeated in translation"
    unknown = [n for n in found if n not in expected]
    if unknown:
        return None, f"marker [[{unknown[0]}]] in translation was never in the source"
    return MARKER.sub(lambda m: masked.originals[int(m.group(1)) - 1], translated), None


def paragraphs(text: str) -> tuple[list[str], list[str]]:
    """The paragraphs of `text` and the separators between them (blank lines as written)."""
    pieces = re.split(r"(\n[ \t]*\n\s*)", text)
    return pieces[0::2], pieces[1::2]


def join(paras: list[str], seps: list[str]) -> str:
    out = [paras[0]]
    for sep, para in zip(seps, paras[1:]):
        out += [sep, para]
    return "".join(out)


def only_markers(text: str) -> bool:
    """Nothing to translate: markers, whitespace and punctuation only."""
    return not re.sub(r"[\W_]+", "", MARKER.sub("", text))
