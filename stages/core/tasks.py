"""Self-Instruct and Alpaca text handling: prompts, parsers and the published filters.

Pure functions over strings, used by the self_instruct stage and tested on their own. The
prompt wording is the project's; the structure and the filters follow the papers:

- Alpaca (Taori et al., 2023; what Okapi used): each request shows 3 seed tasks, each with
  its instruction, input (`<noinput>` when empty) and output, separated by `###` and
  numbered, and asks the model to go on numbering new tasks written the same way. A reply
  is split at `###`; an item is kept only when it has exactly an instruction, an input and an
  output; only the last item of a reply cut by the token budget is dropped as truncated.
- Filters on an instruction (both papers): fewer than 4 or more than 150 words; a blocked
  word (whole word, any case: tasks a text-only model cannot do); starting with "Write a
  program"; a first character that is ASCII punctuation or not ASCII.
- Filters on an instance: an empty output; an input equal to its output; among a task's
  instances, one input with different outputs drops them all.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

# tasks a text-only model cannot do (Self-Instruct's list, kept by Alpaca)
BLOCKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)

NO_INPUT = "<noinput>"


def instruction_problem(text: str, min_words: int = 4, max_words: int = 150, blocklist: Sequence[str] = BLOCKLIST) -> str | None:
    """Why an instruction is dropped, or None. One reason per instruction, checked in the
    order the papers list them."""
    words = text.split()
    if not words:
        return "empty instruction"
    if len(words) < min_words:
        return f"fewer than {min_words} words"
    if len(words) > max_words:
        return f"more than {max_words} words"
    low = text.lower()
    for word in blocklist:
        if re.search(rf"\b{re.escape(word.lower())}\b", low):
            return f"blocked word {word!r}"
    if text.startswith("Write a program"):
        return "starts with 'Write a program'"
    if text[0] in string.punctuation:
        return "starts with punctuation"
    if not text[0].isascii():
        return "starts with a non-ASCII character"
    return None


def instance_problem(task_input: str, output: str) -> str | None:
    """Why one instance is dropped, or None."""
    if not output.strip():
        return "empty output"
    if task_input.strip() == output.strip():
        return "input equals output"
    return None


def conflicting_inputs(instances: Sequence[tuple[str, str]]) -> bool:
    """True when one non-empty input appears with different outputs: the task is ill-posed
    and all its instances are dropped."""
    seen: dict[str, str] = {}
    for task_input, output in instances:
        key = task_input.strip()
        if not key:
            continue
        if key in seen and seen[key] != output.strip():
            return True
        seen.setdefault(key, output.strip())
    return False


# -- Alpaca ---------------------------------------------------------------------------------

ALPACA_HEADER = (
    "Write {total} different tasks for teaching an AI assistant to follow instructions. "
    "What makes a good list:\n"
    "1. The tasks differ from one another: different verbs, topics and kinds of work "
    "(open questions, brainstorming, classification, rewriting, editing, reasoning, coding, "
    "creative writing and more).\n"
    "2. Each instruction is one or two sentences of English, phrased as a request or a question.\n"
    "3. A text-only assistant can do every task: nothing that needs seeing, hearing, drawing, "
    "files, the internet or acting in the world.\n"
    "4. About half of the tasks come with an input: a concrete piece of text, data or code the "
    "instruction works on, under 100 words. A task that needs no input has {no_input} as its input.\n"
    "5. The output is a good answer to the instruction and its input, under 100 words.\n\n"
    "List of {total} tasks:"
)


def alpaca_prompt(demos: Sequence[dict], new_tasks: int) -> tuple[str, int]:
    """The prompt for one request, and the number its first new task gets. `demos` are seed
    tasks with `instruction` and an instance (`input`, `output`)."""
    total = len(demos) + new_tasks
    parts = [ALPACA_HEADER.format(total=total, no_input=NO_INPUT)]
    for n, task in enumerate(demos, 1):
        inst = task["instances"][0] if task.get("instances") else {"input": "", "output": ""}
        parts.append(
            f"###\n{n}. Instruction: {_one_line(task['instruction'])}\n"
            f"{n}. Input:\n{inst.get('input') or NO_INPUT}\n"
            f"{n}. Output:\n{inst.get('output', '')}"
        )
    first = len(demos) + 1
    parts.append(f"###\n{first}. Instruction:")
    return "\n".join(parts), first


def alpaca_stop(demos: int, new_tasks: int) -> tuple[str, ...]:
    """Stop before the model starts the task after the last one asked for."""
    after = demos + new_tasks + 1
    return (f"{after}. Instruction:",)


def parse_alpaca(reply: str, first: int, truncated: bool) -> list[tuple[dict[str, str] | None, str, str | None]]:
    """The tasks in one reply: (task or None, the raw item, why it was not parsed or None),
    in order. The reply continues the prompt, so it starts inside task `first`."""
    raw = f"{first}. Instruction:" + reply
    items = [item for item in re.split(r"###", raw)]
    out: list[tuple[dict[str, str] | None, str, str | None]] = []
    for i, item in enumerate(items):
        if not item.strip():
            continue
        if truncated and i == len(items) - 1:
            out.append((None, item, "truncated: the last task was cut by the token budget"))
            continue
        parts = re.split(r"\d+\s?\.\s?(Instruction|Input|Output):", item)
        if len(parts) != 7 or [p for p in parts[1::2]] != ["Instruction", "Input", "Output"]:
            out.append((None, item, "unparseable task: expected an instruction, an input and an output"))
            continue
        task_input = parts[4].strip()
        if task_input.lower() == NO_INPUT:
            task_input = ""
        out.append(({"instruction": _one_line(parts[2]), "input": task_input, "output": parts[6].strip()}, item, None))
    return out


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# -- Self-Instruct (the original) ---------------------------------------------------------------

SI_LIST_HEAD = "A numbered list of varied tasks that people ask an AI assistant to do:"


def si_list_prompt(instructions: Sequence[str]) -> tuple[str, int]:
    """The instruction-generation prompt (8 in-context instructions, the model continues the
    numbering) and the number of the first new one."""
    lines = [SI_LIST_HEAD] + [f"{n}. {_one_line(text)}" for n, text in enumerate(instructions, 1)]
    first = len(instructions) + 1
    lines.append(f"{first}.")
    return "\n".join(lines), first


def si_list_stop(last: int = 15) -> tuple[str, ...]:
    """The list ends at a blank line or before item `last + 1`."""
    return ("\n\n", f"\n{last + 1}.", f"{last + 1} .")


def parse_si_list(reply: str, truncated: bool) -> list[tuple[str | None, str, str | None]]:
    """The instructions in one reply: (instruction or None, raw item, problem or None)."""
    items = re.split(r"\n\d+\s?\.\s", "\n0. " + reply.lstrip())[1:]
    out: list[tuple[str | None, str, str | None]] = []
    for i, item in enumerate(items):
        if truncated and i == len(items) - 1:
            out.append((None, item, "truncated: the last instruction was cut by the token budget"))
            continue
        text = _one_line(item)
        if text:
            out.append((text, item, None))
    return out


CLF_HEAD = (
    "For each task, answer whether it is a classification task: a task whose answer is one "
    "label taken from a small, fixed set of labels."
)


def clf_prompt(examples: Sequence[dict], instruction: str) -> str:
    """Few-shot: is this task a classification task? `examples` carry `is_classification`."""
    parts = [CLF_HEAD]
    for task in examples:
        parts.append(f"Task: {_one_line(task['instruction'])}\nClassification task? {'Yes' if task.get('is_classification') else 'No'}")
    parts.append(f"Task: {_one_line(instruction)}\nClassification task?")
    return "\n\n".join(parts)


def parse_clf(reply: str) -> bool | None:
    word = (reply.strip().split() or [""])[0].strip(".,:;!").lower()
    return True if word == "yes" else False if word == "no" else None


GEN_HEAD = (
    "Write examples for each task below. Give several examples when the task allows it. When a "
    "task needs no further input, write only the output."
)
CLF_INSTANCE_HEAD = (
    "For each classification task below, first name one of its class labels and then write an "
    "input that belongs to that label; do this for several labels. When a task needs no input, "
    "give only the label."
)


def instance_prompt(examples: Sequence[dict], instruction: str, classification: bool) -> str:
    """Instance generation as Self-Instruct did it: input first for a generation task, the
    class label first for a classification task. `examples` are seed tasks of the same kind."""
    parts = [CLF_INSTANCE_HEAD if classification else GEN_HEAD]
    for task in examples:
        instances = task.get("instances") or []
        block = [f"Task: {_one_line(task['instruction'])}"]
        if classification:
            for inst in instances:
                block.append(f"Class label: {inst['output']}" + (f"\nInput: {inst['input']}" if inst.get("input") else ""))
        elif all(not inst.get("input") for inst in instances):
            block += [f"Output: {inst['output']}" for inst in instances[:1]]
        else:
            for n, inst in enumerate(instances, 1):
                block.append(f"Example {n}\nInput: {inst.get('input', '')}\nOutput: {inst['output']}")
        parts.append("\n".join(block))
    parts.append(f"Task: {_one_line(instruction)}\n")
    return "\n\n".join(parts)


INSTANCE_STOP = ("\nTask:", "Task:")


def parse_instances(reply: str, classification: bool, truncated: bool) -> tuple[list[tuple[str, str]], int]:
    """(input, output) pairs from an instance reply, and how many pieces did not parse (a
    truncated last piece counts as not parsed)."""
    if classification:
        if "Class label:" not in reply:
            return [], int(bool(reply.strip()))
        pieces = [p for p in re.split(r"(?:^|\n)\s*Class label:", reply) if p.strip()]
    elif re.search(r"(?:^|\n)\s*Example\s+\d+", reply):
        pieces = [p for p in re.split(r"(?:^|\n)\s*Example\s+\d+\s*:?", reply) if p.strip()]
    else:
        pieces = [reply] if reply.strip() else []
    pairs, bad = [], 0
    for i, piece in enumerate(pieces):
        if truncated and i == len(pieces) - 1:
            bad += 1
            continue
        if classification:
            label, _, rest = piece.strip().partition("\n")
            m = re.match(r"\s*Input:\s*(.*)", rest, flags=re.S)
            pairs.append(((m.group(1).strip() if m else rest.strip()), label.strip()))
            continue
        m = re.match(r"\s*(?:Input:\s*(.*?)\s*\n)?\s*Output:\s*(.*)", piece, flags=re.S)
        if not m:
            bad += 1
            continue
        pairs.append(((m.group(1) or "").strip(), m.group(2).strip()))
    return pairs, bad
