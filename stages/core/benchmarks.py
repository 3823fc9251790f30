"""Multiple-choice benchmarks in the Okapi file format, and the two evaluation protocols.

A benchmark file holds rows of one of these shapes (JSON array or JSONL):

- `arc` / `mmlu` (Okapi's m_arc, m_mmlu): `id`, `instruction`, `option_a`..`option_d`,
  optional `option_e`, `answer` ("A".."E");
- `hellaswag` (Okapi's m_hellaswag): `activity_label`, `ctx_a`, `ctx_b`, `endings`, `label`;
- `mc` (the built-in mini benchmark): `id`, `lang`, `question`, `choices`, `answer` (index).

A protocol turns a row into a document: the query text, the choice continuations and the
gold index, and decides split, shots, shot sampling and document order. `okapi` reproduces
the Okapi authors' harness (nlp-uoregon/mlmm-evaluation): English scaffolding, ARC 25-shot
from train, MMLU 25-shot from dev scoring the answer texts, HellaSwag 0-shot, one
`random.Random(42)` that first shuffles the documents and then draws every document's shots.
`lm-eval` reproduces lm-evaluation-harness 0.4's okapi task YAMLs (0-shot; m_mmlu scores the
letters; shots, when asked for, drawn by a `random.Random(1234)` per task).

Everything here is plain Python (no torch): configs are validated with it.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyalign.stages.core.errors import UserError
from polyalign.stages.core.io import expand_path

TASKS = ("arc", "mmlu", "hellaswag", "mc")
PROTOCOLS = ("okapi", "lm-eval")
TEMPLATES = ("question_answer", "question_choices_answer", "letters", "hellaswag")
LETTERS = "ABCDE"

# Defaults per protocol and task. Any of these can be overridden per benchmark and per language.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "okapi": {
        "arc": dict(split="test", shot_split="train", shots=25, template="question_answer", preprocess=False),
        "mmlu": dict(split="test", shot_split="dev", shots=25, template="question_choices_answer", preprocess=False),
        "hellaswag": dict(split="validation", shot_split="validation", shots=0, template="hellaswag", preprocess=True),
        "mc": dict(split="test", shot_split="test", shots=0, template="question_answer", preprocess=False),
    },
    "lm-eval": {
        "arc": dict(split="test", shot_split="train", shots=0, template="question_answer", preprocess=True),
        # lm-eval's m_mmlu takes the first shots of its few-shot split (sampler first_n)
        "mmlu": dict(split="test", shot_split="dev", shots=0, template="letters", preprocess=False, shot_sampling="first_n"),
        "hellaswag": dict(split="validation", shot_split="validation", shots=0, template="hellaswag", preprocess=True),
        "mc": dict(split="test", shot_split="test", shots=0, template="question_answer", preprocess=False),
    },
}
PROTOCOL_SEED = {"okapi": 42, "lm-eval": 1234}


@dataclass
class Doc:
    """One scored question: the prompt, the continuations (without delimiter) and the answer."""

    id: str
    query: str
    choices: list[str]
    gold: int


@dataclass
class Settings:
    """Everything that decides the requests of one benchmark in one language."""

    task: str
    protocol: str
    source: str
    split: str
    shot_split: str
    shots: int
    template: str
    preprocess: bool
    shot_sampling: str = "random"  # random (per document) | fixed (one draw for all) | first_n
    seed: int = 42
    limit: int | None = None


# ---------------------------------------------------------------------------------------
# reading and checking rows


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSON array or JSONL file; a broken row is named by file and row number."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{path}: invalid JSON ({exc.args[0]})") from None
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise UserError(f"{path}: row {i}: expected a JSON object")
        return rows
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path}: row {i}: invalid JSON ({exc.args[0]})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {i}: expected a JSON object")
        rows.append(row)
    return rows


def _need(path: Path, i: int, row: dict, name: str, typ: type | tuple[type, ...]) -> Any:
    if name not in row or row[name] is None:
        raise UserError(f"{path}: row {i}: missing field {name!r}")
    value = row[name]
    if not isinstance(value, typ):
        raise UserError(f"{path}: row {i}: field {name!r} has type {type(value).__name__}")
    return value


def normalise(task: str, path: Path, rows: list[dict]) -> list[dict]:
    """Check every row and bring it to {id, question, options, answer, raw}."""
    out = []
    for i, row in enumerate(rows, 1):
        if task in ("arc", "mmlu"):
            question = _need(path, i, row, "instruction", str)
            options = []
            for letter in "abcde":
                value = row.get(f"option_{letter}")
                if value is None or value == "":
                    if letter in "ab":
                        raise UserError(f"{path}: row {i}: missing field 'option_{letter}'")
                    continue
                if not isinstance(value, str):
                    raise UserError(f"{path}: row {i}: field 'option_{letter}' has type {type(value).__name__}")
                options.append(value)
            answer = _need(path, i, row, "answer", str).strip()
            if answer not in LETTERS[: len(options)] or not answer:
                raise UserError(f"{path}: row {i}: field 'answer' is {answer!r}, not one of {LETTERS[: len(options)]}")
            ident = str(row.get("id", i))
            out.append({"id": ident, "question": question, "options": options, "answer": LETTERS.index(answer)})
        elif task == "hellaswag":
            label = _need(path, i, row, "activity_label", str)
            ctx_a = _need(path, i, row, "ctx_a", str)
            ctx_b = _need(path, i, row, "ctx_b", str)
            endings = _need(path, i, row, "endings", list)
            if len(endings) < 2 or not all(isinstance(e, str) and e.strip() for e in endings):
                raise UserError(f"{path}: row {i}: field 'endings' needs at least two non-empty strings")
            gold = _need(path, i, row, "label", (str, int))
            try:
                gold = int(gold)
            except ValueError:
                raise UserError(f"{path}: row {i}: field 'label' is {gold!r}, not an index") from None
            if not 0 <= gold < len(endings):
                raise UserError(f"{path}: row {i}: field 'label' {gold} is out of range")
            ident = str(row.get("ind", row.get("id", i)))
            question = label + ": " + ctx_a + " " + ctx_b.capitalize()
            out.append({"id": ident, "question": question, "options": endings, "answer": gold})
        elif task == "mc":
            ident = _need(path, i, row, "id", str)
            question = _need(path, i, row, "question", str)
            choices = _need(path, i, row, "choices", list)
            if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise UserError(f"{path}: row {i}: field 'choices' needs at least two non-empty strings")
            answer = _need(path, i, row, "answer", int)
            if not 0 <= answer < len(choices):
                raise UserError(f"{path}: row {i}: field 'answer' {answer} is out of range")
            lang = _need(path, i, row, "lang", str)
            out.append({"id": ident, "question": question, "options": choices, "answer": answer, "lang": lang})
        else:  # pragma: no cover - guarded by the config
            raise ValueError(task)
    return out


# ---------------------------------------------------------------------------------------
# where the rows of one language and split come from


def builtin_path() -> Path:
    from polyalign.stages.core.io import builtin

    return builtin("mini_mc.jsonl")


def resolve_file(source: str, lang: str, split: str) -> Path | None:
    """The local file for a language and split, or None for a Hugging Face source."""
    if source == "builtin":
        return builtin_path()
    if source.startswith("hf:"):
        return None
    return expand_path(fill_template(source, "source", lang=lang, split=split))


def fill_template(template: str, what: str, **values: str) -> str:
    """`template` with {name} fields filled; anything else in braces is a one-line error."""
    import string

    allowed = ", ".join("{" + k + "}" for k in values)
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError:
        fields = [("?", "", None)]
    if any(f not in values or spec or conv for f, spec, conv in fields):
        raise UserError(f"{what} {template!r}: only {allowed} may appear in braces")
    return template.format(**values)


_CACHE: dict[tuple, list[dict]] = {}


class BenchmarkUnavailable(UserError):
    """A benchmark could not be read right now (permission, network, the Hub): the unit
    fails with this one-line reason and is tried again on the next run. Only a definite
    "this language has no file" (FileNotFoundError) is recorded as missing."""


def load_rows(task: str, source: str, lang: str, split: str) -> list[dict]:
    """Checked, normalised rows; raises FileNotFoundError when the language has no file and
    BenchmarkUnavailable when it cannot tell (the file or the Hub could not be read)."""
    path = resolve_file(source, lang, split)
    if path is None:
        return _load_hub(task, source[3:], lang, split)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(str(path)) from None
    except OSError as exc:  # e.g. a folder on the way that may not be read
        raise BenchmarkUnavailable(f"{path}: cannot be read now ({exc.strerror or exc}); the next run tries again") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} (not a file)")
    key = (task, str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        try:
            rows = read_rows(path)
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise BenchmarkUnavailable(f"{path}: cannot be read now ({exc.strerror or exc}); the next run tries again") from None
        if not rows:
            raise UserError(f"{path}: no rows")
        _CACHE[key] = normalise(task, path, rows)
    rows = _CACHE[key]
    if task == "mc":  # mc rows name their language: one file may hold several
        rows = [r for r in rows if r["lang"] == lang]
        if not rows:
            raise FileNotFoundError(f"{path} (no rows for language {lang!r})")
    return rows


def _hub_says_absent(exc: BaseException) -> bool:
    """True when the Hub answered that this language (config) or split does not exist."""
    text = str(exc)
    return isinstance(exc, ValueError) and (
        "BuilderConfig" in text or "Unknown split" in text or "config name" in text.lower()
    )


def _load_hub(task: str, name: str, lang: str, split: str) -> list[dict]:
    """A Hugging Face dataset in the same format (e.g. alexandrainst/m_arc), for online users."""
    import datasets

    repo, _, revision = name.partition("@")
    try:
        ds = datasets.load_dataset(repo, lang, split=split, revision=revision or None)
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; report one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if _hub_says_absent(exc):
            raise FileNotFoundError(f"hf:{name} {lang}/{split}: {first}") from None
        raise BenchmarkUnavailable(f"hf:{name} {lang}/{split}: {type(exc).__name__}: {first}; the next run tries again") from None
    return normalise(task, Path(f"hf:{name}/{lang}/{split}"), [dict(r) for r in ds])


# ---------------------------------------------------------------------------------------
# rows -> documents -> contexts


def preprocess_text(text: str) -> str:
    """HellaSwag's clean-up (WikiHow bracket artifacts), also used by lm-eval's m_arc."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def to_doc(row: dict, template: str, preprocess: bool) -> Doc:
    clean = preprocess_text if preprocess else (lambda s: s)
    question, options = row["question"], row["options"]
    if template == "hellaswag":
        return Doc(row["id"], clean(question), [clean(o) for o in options], row["answer"])
    if template == "question_answer":
        query = "Question: " + clean(question) + "\nAnswer:"
    elif template == "question_choices_answer":
        listed = "".join(f"{LETTERS[k]}. {o}\n" for k, o in enumerate(options))
        query = "Question: " + clean(question) + "\nChoices:\n" + listed + "Answer:"
    elif template == "letters":
        listed = "".join(f"{LETTERS[k]}. {o}\n" for k, o in enumerate(options))
        return Doc(row["id"], question.strip() + "\n" + listed + "Answer:", list(LETTERS[: len(options)]), row["answer"])
    else:  # a custom template with {question} and optionally {options}
        listed = "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(options))
        query = template.replace("{question}", clean(question)).replace("{options}", listed)
    return Doc(row["id"], query, [clean(o) for o in options], row["answer"])


def shot_text(doc: Doc) -> str:
    return doc.query + " " + doc.choices[doc.gold]


def build_contexts(docs: list[Doc], pool: list[Doc], s: Settings, same_split: bool, lang: str = "") -> tuple[list[Doc], list[str], str | None]:
    """Order the documents, draw their shots and return (docs, contexts, shared prefix or None).

    The shared prefix is the text every context starts with when all documents have the same
    shots (fixed or first-n shot sets); the scorer encodes it once for the whole benchmark.
    """
    rnd = random.Random(s.seed)
    docs = list(docs)
    if s.protocol == "okapi":
        rnd.shuffle(docs)  # the Okapi harness shuffles before applying the limit
    if s.limit is not None:
        docs = docs[: s.limit]
    if s.shots == 0:
        return docs, [d.query for d in docs], None
    # Okapi's harness draws exactly k shots for tasks with training docs (ARC), otherwise k+1
    # and drops the document itself (MMLU, HellaSwag); lm-eval draws k+1 only when the shots
    # come from the evaluated split; fixed and first_n take k+1 once
    exact_k = s.protocol == "okapi" and s.task == "arc"
    extra = 0 if exact_k else 1 if (same_split or (s.protocol == "okapi" and s.shot_sampling == "random")) else 0
    check_pool(s, len(pool), extra, lang)

    def draw(doc: Doc) -> list[Doc]:
        return [x for x in rnd.sample(pool, s.shots + extra) if x != doc][: s.shots]

    if s.shot_sampling in ("fixed", "first_n"):
        # one shot set for all documents (a document drawn as a shot gets the next one instead)
        head = pool[: s.shots + 1] if s.shot_sampling == "first_n" else rnd.sample(pool, min(len(pool), s.shots + 1))
        shot_sets = [[x for x in head if x != d][: s.shots] for d in docs]
        common = head[: s.shots]
        prefix = "\n\n".join(shot_text(x) for x in common) + "\n\n"
    else:
        shot_sets = [draw(d) for d in docs]
        prefix = None
    contexts = ["\n\n".join(shot_text(x) for x in shots) + "\n\n" + d.query for d, shots in zip(docs, shot_sets)]
    return docs, contexts, prefix


def check_pool(s: Settings, size: int, extra: int, lang: str) -> None:
    if size < s.shots + extra:
        where = resolve_file(s.source, lang, s.shot_split) or f"{s.source} {lang}/{s.shot_split}"
        raise UserError(f"{where}: {size} documents cannot give {s.shots} shots")


def prepare(s: Settings, lang: str) -> tuple[list[Doc], list[str], str | None]:
    """Read, check and turn one benchmark language into (docs, contexts, shared prefix)."""
    docs = [to_doc(r, s.template, s.preprocess) for r in load_rows(s.task, s.source, lang, s.split)]
    pool: list[Doc] = []
    same = s.shot_split == s.split or s.task == "mc"
    if s.shots:
        pool = docs if same else [to_doc(r, s.template, s.preprocess) for r in load_rows(s.task, s.source, lang, s.shot_split)]
    return build_contexts(docs, pool, s, same, lang)
