"""Mutation check of the data filters: each mutation breaks one filter on purpose, and the
unit tests must then fail. Run from the project root:

    .venv/bin/python tests/mutation_check.py

Prints `caught` or `MISSED` per mutation and exits 1 if any was missed. The file is restored
afterwards, whatever happens.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
src = ROOT / "stages" / "core" / "tasks.py"
TESTS = "tests/unit/test_tasks.py"
mutations = {
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


def main() -> int:
    orig = src.read_text()
    missed = 0
    try:
        for name, (a, b) in mutations.items():
            if a not in orig:
                print(f"STALE   {name}: the code it mutates changed")
                missed += 1
                continue
            src.write_text(orig.replace(a, b, 1))
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", TESTS], capture_output=True, text=True, cwd=ROOT)
            print(f"{'caught ' if r.returncode else 'MISSED '} {name}")
            missed += r.returncode == 0
    finally:
        src.write_text(orig)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
