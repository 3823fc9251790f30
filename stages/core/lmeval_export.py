"""Write an lm-evaluation-harness task for a polyalign benchmark setting.

The task reads the same local files and uses lm-eval's own definitions of the okapi tasks
(the templates of `lm_eval/tasks/okapi/*`, and for m_arc and m_hellaswag their
`utils.process_docs`, copied from the installed lm-eval next to the YAML). Running it with
lm-eval and the same model must give the numbers polyalign's `lm-eval` protocol gives: the
parity test and `bench/eval_speed.py` do exactly that. Only the `lm-eval` protocol has an
lm-eval equivalent (Okapi's own harness shuffles documents first).

Plain Python: lm-eval is needed to *run* the task, not to write it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from polyalign.stages.core.benchmarks import Settings, resolve_file

def _jsonl(rows: list[dict], path: Path) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path.resolve())


def _raw_rows(s: Settings, lang: str, split: str) -> list[dict]:
    path = resolve_file(s.source, lang, split)
    if path is None:
        raise ValueError("only local files can be exported")
    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    if s.task == "mc":
        rows = [r for r in rows if r["lang"] == lang]
    for r in rows:  # the okapi utils index option_e unconditionally
        if s.task in ("arc", "mmlu"):
            r.setdefault("option_e", None)
    return rows


def write_task(name: str, s: Settings, lang: str, folder: Path) -> str:
    """Write `<folder>/<name>.yaml` (+ data and utils); return the task name."""
    if s.protocol != "lm-eval":
        raise ValueError("only the lm-eval protocol has an lm-eval task equivalent")
    import lm_eval

    okapi = Path(lm_eval.__file__).parent / "tasks" / "okapi"
    folder.mkdir(parents=True, exist_ok=True)
    data = {"test": _jsonl(_raw_rows(s, lang, s.split), folder / f"{name}.test.jsonl")}
    if s.shots and s.shot_split != s.split and s.task != "mc":
        data["train"] = _jsonl(_raw_rows(s, lang, s.shot_split), folder / f"{name}.train.jsonl")
    lines: list[str] = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        *[f"    {k}: {v}" for k, v in data.items()],
        "output_type: multiple_choice",
        "test_split: test",
        f"fewshot_split: {'train' if 'train' in data else 'test'}",
    ]
    if s.shot_sampling == "first_n":
        lines += ["fewshot_config:", "  sampler: first_n"]
    elif s.shot_sampling == "fixed":
        raise ValueError("lm-eval has no 'fixed' sampler; use first_n")
    if s.task == "arc" and s.template == "question_answer" and s.preprocess:
        shutil.copy(okapi / "arc_multilingual" / "utils.py", folder / "utils.py")
        lines += ["process_docs: !function utils.process_docs", 'doc_to_text: "query"', 'doc_to_target: "gold"', 'doc_to_choice: "choices"']
    elif s.task == "hellaswag" and s.template == "hellaswag":
        shutil.copy(okapi / "hellaswag_multilingual" / "utils.py", folder / "utils.py")
        lines += ["process_docs: !function utils.process_docs", 'doc_to_text: "query"', 'doc_to_target: "{{label.lstrip()}}"', 'doc_to_choice: "choices"']
    elif s.task == "mmlu" and s.template == "letters":
        lines += [
            'doc_to_text: "{{instruction.strip()}}\\nA. {{option_a}}\\nB. {{option_b}}\\nC. {{option_c}}\\nD. {{option_d}}\\nAnswer:"',
            'doc_to_choice: ["A", "B", "C", "D"]',
            "doc_to_target: answer",
        ]
    elif s.task == "mc" and s.template == "question_answer" and not s.preprocess:
        lines += ['doc_to_text: "Question: {{question}}\\nAnswer:"', 'doc_to_choice: "{{choices}}"', "doc_to_target: answer"]
    else:
        raise ValueError(f"no lm-eval equivalent for task {s.task!r} with template {s.template!r}")
    lines += [
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
    ]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return name


def samples_by_doc(output: dict[str, Any], task: str) -> list[dict]:
    """lm-eval's per-document samples in document order: lls, acc, acc_norm, contexts."""
    rows = sorted(output["samples"][task], key=lambda r: r["doc_id"])
    return [
        {
            "context": r["arguments"][0][0],
            "loglikelihoods": [float(x[0]) for x in r["filtered_resps"]],
            "acc": float(r["acc"]),
            "acc_norm": float(r["acc_norm"]),
        }
        for r in rows
    ]

