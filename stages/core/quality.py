"""Quality checks of one translated field. Each returns None or a short reason; the translate
stage quarantines the record with the reasons and the card counts them per language.

- `wrong_language`: an offline detector (lingua-language-detector, its models ship in the
  wheel) where it knows the language, and a script check everywhere: most letters of the
  translation must be in the target language's script(s). Texts with fewer than
  `MIN_LETTERS` letters are not judged.
- `echo`: the translation repeats the English source.
- `length_ratio`: target/source characters outside the bounds for the target's script.
- `repetition`: a loop, the way small models fail: a short piece repeated many times in a row,
  or a word sequence repeated far more often than in the source.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections import Counter
from typing import Any

MIN_LETTERS = 20

# scripts (Unicode names as unicodedata gives them, first word) per target language
SCRIPTS: dict[str, tuple[str, ...]] = {
    "ar": ("ARABIC",), "bn": ("BENGALI",), "gu": ("GUJARATI",), "hi": ("DEVANAGARI",),
    "mr": ("DEVANAGARI",), "ne": ("DEVANAGARI",), "kn": ("KANNADA",), "ml": ("MALAYALAM",),
    "ta": ("TAMIL",), "te": ("TELUGU",), "hy": ("ARMENIAN",), "ru": ("CYRILLIC",),
    "uk": ("CYRILLIC",), "sr": ("CYRILLIC", "LATIN"), "zh": ("CJK",),
}
# target/source character ratios a faithful translation of English stays within, per script
RATIO_BOUNDS: dict[str, tuple[float, float]] = {
    "LATIN": (0.5, 2.2), "CYRILLIC": (0.5, 2.2), "ARMENIAN": (0.5, 2.2), "ARABIC": (0.4, 1.8),
    "CJK": (0.12, 1.0), "DEVANAGARI": (0.5, 2.2), "BENGALI": (0.5, 2.2), "GUJARATI": (0.5, 2.2),
    "KANNADA": (0.5, 2.5), "MALAYALAM": (0.5, 2.6), "TAMIL": (0.5, 2.6), "TELUGU": (0.5, 2.5),
}
# what lingua calls the languages it knows (kn, ml and ne it does not: script check only)
LINGUA_NAMES: dict[str, str] = {
    "en": "ENGLISH", "ar": "ARABIC", "bn": "BENGALI", "ca": "CATALAN", "da": "DANISH", "de": "GERMAN",
    "es": "SPANISH", "eu": "BASQUE", "fr": "FRENCH", "gu": "GUJARATI", "hi": "HINDI", "hr": "CROATIAN",
    "hu": "HUNGARIAN", "hy": "ARMENIAN", "id": "INDONESIAN", "it": "ITALIAN", "mr": "MARATHI",
    "nl": "DUTCH", "pt": "PORTUGUESE", "ro": "ROMANIAN", "ru": "RUSSIAN", "sk": "SLOVAK", "sr": "SERBIAN",
    "sv": "SWEDISH", "ta": "TAMIL", "te": "TELUGU", "uk": "UKRAINIAN", "vi": "VIETNAMESE", "zh": "CHINESE",
}


_CODES = {name: code for code, name in LINGUA_NAMES.items()}
# lingua's Serbian model reads Cyrillic; Serbian in Latin letters it calls Croatian
ALSO_ACCEPTED: dict[str, set[str]] = {"sr": {"hr"}}


def scripts_of(lang: str) -> tuple[str, ...]:
    return SCRIPTS.get(lang, ("LATIN",))


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return "CJK" if name.startswith(("CJK", "IDEOGRAPHIC")) else name.split(" ", 1)[0]


def letters(text: str) -> list[str]:
    return [ch for ch in text if ch.isalpha()]


def script_share(text: str, lang: str) -> float:
    chars = letters(text)
    if not chars:
        return 1.0
    wanted = scripts_of(lang)
    return sum(_script(ch) in wanted for ch in chars) / len(chars)


_DETECTOR: Any = None
_DETECTOR_LOCK = threading.Lock()


def _detector() -> Any:
    """One lingua detector over every language polyalign knows that lingua knows (built once
    per process; language models load on first use)."""
    global _DETECTOR
    with _DETECTOR_LOCK:
        if _DETECTOR is None:
            from lingua import Language, LanguageDetectorBuilder

            _DETECTOR = LanguageDetectorBuilder.from_languages(*(getattr(Language, n) for n in LINGUA_NAMES.values())).build()
    return _DETECTOR


def detect(text: str) -> str | None:
    """The language code lingua finds most likely, or None when it cannot say."""
    found = _detector().detect_language_of(text)
    return _CODES.get(found.name) if found is not None else None


def wrong_language(text: str, lang: str) -> str | None:
    if len(letters(text)) < MIN_LETTERS:
        return None
    share = script_share(text, lang)
    if share < 0.5:
        return f"wrong script: {share:.0%} of letters in {'/'.join(scripts_of(lang)).lower()}"
    if lang in LINGUA_NAMES:
        found = detect(text)
        if found is not None and found != lang and found not in ALSO_ACCEPTED.get(lang, set()):
            return f"language identified as {found}, not {lang}"
    return None


def echo(source: str, target: str) -> str | None:
    norm = lambda t: re.sub(r"\W+", "", t.lower())  # noqa: E731
    if len(source.split()) >= 3 and norm(source) == norm(target):
        return "untranslated (identical to the source)"
    return None


def length_ratio(source: str, target: str, lang: str, bounds: tuple[float, float] | None = None, min_chars: int = 20) -> str | None:
    if len(source) < min_chars:
        return None
    lo, hi = bounds or RATIO_BOUNDS.get(scripts_of(lang)[0], (0.5, 2.2))
    ratio = len(target) / len(source)
    if ratio < lo or ratio > hi:
        return f"length ratio {ratio:.2f} outside [{lo}, {hi}]"
    return None


_LOOP = re.compile(r"(.{2,60}?)\1{4,}", re.S)


def repetition(source: str, target: str, n: int = 3) -> str | None:
    """A piece of 2-60 characters five or more times in a row, or a word n-gram that occurs at
    least 4 times and 3 times more often than the most repeated n-gram of the source."""
    loop = _LOOP.search(target)
    if loop and not _LOOP.search(source):
        return f"repetition loop: {loop.group(1)[:20]!r} repeated"

    def top(text: str) -> int:
        words = text.lower().split()
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        return max(grams.values(), default=0)

    t, s = top(target), top(source)
    if t >= 4 and t >= 3 * max(s, 1):
        return f"repetition loop: a {n}-word sequence {t} times"
    return None
