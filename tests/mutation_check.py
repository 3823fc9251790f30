"""Mutation check of the data filters, masking and translation checks: each mutation breaks
one of them on purpose, and its unit tests must then fail. Run from the project root:

    .venv/bin/python tests/mutation_check.py

Prints `caught` or `MISSED` per mutation and exits 1 if any was missed. The file is restored
afterwards, whatever happens.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# file under stages/core -> (its unit tests, {mutation name: (text, replacement)})
TASKS = {
  "min words off by one": ("if len(words) < min_words:", "if len(words) <= min_words - 2:"),
  "max words off by one": ("if len(words) > max_words:", "if len(words) >= max_words:"),
  "blocklist substring match": ('rf"\\b{re.escape(word.lower())}\\b"', 'rf"{re.escape(word.lower())}"'),
  "blocklist case-sensitive": ("low = text.lower()", "low = text"),
  "blocklist item missing": ('"flowchart", "diagram",', '"flowchart",'),
  "program check off": ('if text.startswith("Write a program"):', 'if text.startswith("Write a programme"):'),
  "punctuation check off": ("if text[0] in string.punctuation:", "if text[0] in '-':"),
  "ascii check off": ("if not text[0].isascii():", "if not text[0].isascii() and text[0].isupper():"),
  "empty output check off": ("if not output.strip():", "if not output:"),
  "input==output unstripped": ("if task_input.strip() == output.strip():", "if task_input == output:"),
  "conflict ignores strip": ("if key in seen and seen[key] != output.strip():", "if key in seen and seen[key] != output:"),
  "conflict counts empty input": ("        if not key:\n            continue\n", ""),
  "noinput not mapped": ("if task_input.lower() == NO_INPUT:", "if task_input == 'NOINPUT':"),
  "truncated drops every item": ("if truncated and i == len(items) - 1:", "if truncated:"),
  "truncated ignored": ("if truncated and i == len(items) - 1:", "if False:"),
  "field order unchecked": (' or [p for p in parts[1::2]] != ["Instruction", "Input", "Output"]', ""),
  "unclear classification read as no": ('return True if word == "yes" else False if word == "no" else None', 'return word == "yes"'),
  "truncated instance kept": ("        if truncated and i == len(pieces) - 1:\n            bad += 1\n            continue\n", ""),
  "label-first reply without labels parsed": ('        if "Class label:" not in reply:\n            return [], int(bool(reply.strip()))\n', ""),
  "instruction whitespace kept": ('out.append(({"instruction": _one_line(parts[2])', 'out.append(({"instruction": parts[2].strip()'),
}
MASKING = {
  "code blocks not masked": ('    ("code block", re.compile(r"```.*?(?:```|\Z)", re.S)),\n', ""),
  "inline code not masked": ('("inline code", re.compile(', '("inline code", re.compile(r"(?!)") or re.compile('),
  "urls keep trailing punctuation": (r'''+[^\s<>\"'`\]\).,;:!?]")''', '+")'),
  "e-mails not masked": ('("e-mail", re.compile(', '("e-mail", re.compile(r"(?!)") or re.compile('),
  "placeholders not masked": ('    ("placeholder", re.compile(r"\{\{?\s*[A-Za-z_0-9.]*\s*\}?\}")),\n', ""),
  "numbers inside words masked": ("(?<![\\w.,])[-+]?", "(?<![.,])[-+]?"),
  "marker-like source text not masked": ('    ("marker-like text", MARKER),', ""),
  "overlapping spans both taken": ("and not any(m.start() < e and s < m.end() for s, e, _ in taken)", ""),
  "missing marker not caught": ("    if missing:\n", "    if False:\n"),
  "repeated marker not caught": ("    if repeated:\n", "    if False:\n"),
  "unknown marker not caught": ("    if unknown:\n", "    if False:\n"),
  "blank lines with spaces not split": (r'''re.split(r"(\n[ \t]*\n\s*)", text)''', r'''re.split(r"(\n\n)", text)'''),
}
QUALITY = {
  "no script check": ("    if share < 0.5:\n", "    if False:\n"),
  "no language identification": ("        if found is not None and found != lang", "        if False and found != lang"),
  "latin serbian refused": ('ALSO_ACCEPTED: dict[str, set[str]] = {"sr": {"hr"}}', "ALSO_ACCEPTED: dict[str, set[str]] = {}"),
  "short texts judged": ("    if len(letters(text)) < MIN_LETTERS:\n        return None\n", ""),
  "echo ignores case": ("re.sub(r\"\\W+\", \"\", t.lower())", "re.sub(r\"\\W+\", \"\", t)"),
  "one ratio for every script": ("    lo, hi = bounds or RATIO_BOUNDS.get(scripts_of(lang)[0], (0.5, 2.2))", "    lo, hi = bounds or (0.5, 2.2)"),
  "loops not found": ("    if loop and not _LOOP.search(source):", "    if False:"),
  "n-gram loops not found": ("    if t >= 4 and t >= 3 * max(s, 1):", "    if False:"),
  "repetitive source not allowed for": ("    if loop and not _LOOP.search(source):", "    if loop:"),
}
MUTANTS = {
    "tasks.py": ("tests/unit/test_tasks.py", TASKS),
    "masking.py": ("tests/unit/test_masking.py", MASKING),
    "quality.py": ("tests/unit/test_quality.py", QUALITY),
}


def main() -> int:
    missed = 0
    for name, (tests, mutations) in MUTANTS.items():
        src = ROOT / "stages" / "core" / name
        orig = src.read_text()
        try:
            for what, (a, b) in mutations.items():
                if a not in orig:
                    print(f"STALE   {name}: {what}: the code it mutates changed")
                    missed += 1
                    continue
                src.write_text(orig.replace(a, b, 1))
                r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", tests], capture_output=True, text=True, cwd=ROOT)
                print(f"{'caught ' if r.returncode else 'MISSED '} {name}: {what}")
                missed += r.returncode == 0
        finally:
            src.write_text(orig)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
