"""Language codes used by polyalign: the 26 languages of Okapi plus English."""

LANGUAGE_NAMES: dict[str, str] = {
    "en": "English", "ar": "Arabic", "bn": "Bengali", "ca": "Catalan", "da": "Danish",
    "de": "German", "es": "Spanish", "eu": "Basque", "fr": "French", "gu": "Gujarati",
    "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian",
    "it": "Italian", "kn": "Kannada", "ml": "Malayalam", "mr": "Marathi", "ne": "Nepali",
    "nl": "Dutch", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sk": "Slovak",
    "sr": "Serbian", "sv": "Swedish", "ta": "Tamil", "te": "Telugu", "uk": "Ukrainian",
    "vi": "Vietnamese", "zh": "Chinese",
}


def check_languages(codes: list[str]) -> list[str]:
    """Validator helper: every code must be known; returns the list unchanged."""
    unknown = [c for c in codes if c not in LANGUAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown language code(s) {', '.join(unknown)} (known: {', '.join(LANGUAGE_NAMES)})")
    if len(set(codes)) != len(codes):
        raise ValueError("languages must not repeat")
    return codes
