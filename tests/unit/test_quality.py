"""Translation quality checks, one case per reason and a pass for a good translation."""

from __future__ import annotations

import pytest

from polyalign.stages.core.quality import echo, length_ratio, repetition, script_share, wrong_language

SRC = "Write a short paragraph about the history of the bicycle in Europe."


@pytest.mark.parametrize(
    "text, lang, reason",
    [
        ("Écrivez un court paragraphe sur l'histoire de la bicyclette en Europe.", "fr", None),
        ("Escribe un breve párrafo sobre la historia de la bicicleta en Europa.", "fr", "language identified as es, not fr"),
        ("Write a short paragraph about the history of the bicycle in Europe.", "de", "language identified as en, not de"),
        ("Напишите короткий абзац об истории велосипеда в Европе.", "ru", None),
        ("Write a short paragraph about the bicycle in Europe please.", "ru", "wrong script: 0% of letters in cyrillic"),
        ("ಯುರೋಪಿನಲ್ಲಿ ಬೈಸಿಕಲ್ ಇತಿಹಾಸದ ಬಗ್ಗೆ ಒಂದು ಸಣ್ಣ ಪ್ಯಾರಾಗ್ರಾಫ್ ಬರೆಯಿರಿ.", "kn", None),  # script check only
        ("यूरोप में साइकिल के इतिहास के बारे में एक छोटा अनुच्छेद लिखें।", "kn", "wrong script: 0% of letters in kannada"),
        ("写一段关于欧洲自行车历史的短文，不要太长，谢谢你的帮助。", "zh", None),
        ("Napišite kratak odlomak o istoriji bicikla u Evropi, molim vas.", "sr", None),  # Latin Serbian
        ("Bonjour", "de", None),  # too short to judge
    ],
)
def test_language_check(text, lang, reason):
    assert wrong_language(text, lang) == reason


def test_script_share_counts_letters_only():
    assert script_share("Привет, world 123!", "ru") == pytest.approx(6 / 11)
    assert script_share("123 !!", "ru") == 1.0


def test_echo():
    assert echo(SRC, SRC.upper() + "!") == "untranslated (identical to the source)"
    assert echo("Hi there", "Hi there") is None  # under 3 words: names, short labels
    assert echo(SRC, "Écrivez un court paragraphe.") is None


@pytest.mark.parametrize(
    "target, lang, reason",
    [
        ("Écrivez un court paragraphe sur l'histoire de la bicyclette en Europe.", "fr", None),
        ("Vélo.", "fr", "length ratio 0.07 outside [0.5, 2.2]"),
        ("写一段关于欧洲自行车历史的短文。", "zh", None),  # 0.24 of the English length: fine for Chinese
        ("写", "zh", "length ratio 0.01 outside [0.12, 1.0]"),
        ("x" * 200, "fr", "length ratio 2.99 outside [0.5, 2.2]"),
    ],
)
def test_length_ratio_bounds_depend_on_the_script(target, lang, reason):
    assert length_ratio(SRC, target, lang) == reason


def test_length_ratio_skips_short_sources_and_takes_explicit_bounds():
    assert length_ratio("Hi", "Bonjour à vous tous", "fr") is None
    assert length_ratio(SRC, "x" * 200, "fr", bounds=(0.1, 5.0)) is None


def test_repetition_loops():
    assert repetition(SRC, "la la la la la la la la") == "repetition loop: 'la ' repeated"
    assert repetition(SRC, "Le vélo est né en Europe. " * 5).startswith("repetition loop")
    looped = "il était une fois un vélo, puis il était une fois un vélo, et il était une fois un vélo, donc il était une fois"
    assert repetition(SRC, looped) == "repetition loop: a 3-word sequence 4 times"
    assert repetition(SRC, "Écrivez un court paragraphe sur l'histoire de la bicyclette en Europe.") is None
    song = "na na na na na na, hey hey hey"
    assert repetition(song, song) is None  # as repetitive as its source
