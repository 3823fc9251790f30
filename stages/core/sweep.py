"""A sweep: one pipeline config run under several sets of overrides, and the table that
compares them on what papers report and on what they leave out.

- `variants(sets)`: `--set FIELD=a,b,c` options as the product of their values (a comma
  inside brackets, braces or quotes is part of a value).
- `inference_speed(...)`: generation tokens/s of the base model alone, with an adapter
  unmerged (peft computing it beside every layer it touches) and merged into the weights.
- `sweep_rows(...)`: one row per variant from the artifacts of its run: evaluation per
  language, the training stage's wall time, tokens/s, FLOPs, peak memory, trainable
  parameters and saved bytes, and the inference speeds.
- `write_report(...)`: the table as markdown, JSON and a plot.

Works from the results it is given (pipelines and artifacts); it imports no flow.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

from polyalign.stages.core.efficiency import num
from polyalign.stages.core.errors import UserError

PROMPTS = (  # fixed chat prompts for the inference-speed measurement
    "Write two sentences about the sea.",
    "List three uses of a bicycle.",
    "Explain what a library is to a child.",
    "Give a short tip for learning a language.",
)


def split_values(text: str) -> list[str]:
    """`a,b,[c, d],{e: 1, f: 2}` -> ['a', 'b', '[c, d]', '{e: 1, f: 2}']."""
    out: list[str] = []
    cur: list[str] = []
    depth, quote = 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def variants(sets: list[str]) -> list[list[str]]:
    """The override lists of every combination of the swept values, in the order given."""
    axes = []
    for s in sets:
        key, eq, value = s.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set {s!r}: expected FIELD=VALUE[,VALUE...]")
        values = split_values(value)
        if any(not v for v in values):
            raise UserError(f"--set {s!r}: an empty value in the list")
        axes.append([f"{key.strip()}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def label(overrides: list[str], swept: list[str]) -> str:
    """A variant's name: the swept fields' values (the last part of each field name)."""
    parts = [o for o in overrides if o.split("=", 1)[0] in swept] or overrides
    return ", ".join(f"{o.split('=', 1)[0].split('.')[-1]}={o.split('=', 1)[1]}" for o in parts) or "as configured"


# ----------------------------------------------------------------------------- inference cost


def _tokens_per_second(model: Any, tok: Any, new_tokens: int, repeats: int) -> float:
    import torch

    from polyalign.stages.core.loading import device

    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device())
    with torch.no_grad():  # untimed: the first call pays for allocations and kernel choices
        model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)
        best = min(best, time.perf_counter() - start)
    return round(len(PROMPTS) * new_tokens / best, 2)


def inference_speed(base_path: str, model_folder: str | None, dtype: str = "auto", new_tokens: int = 32,
                    repeats: int = 2) -> dict[str, float | None]:
    """Generation tokens/s (greedy, batch of the fixed prompts, `new_tokens` each): `base`
    alone; `unmerged`, the adapter applied by peft on the fly; `merged`, folded into the
    weights (a fully fine-tuned model: merged only; prompt or prefix tuning: unmerged only)."""
    from peft import PeftModel

    from polyalign.stages.core.loading import (
        LOADING, PROMPT_TYPES, adapter_type, device, is_adapter, load_causal_lm, load_tokenizer,
    )

    tok = load_tokenizer(base_path)
    out: dict[str, float | None] = {"base": None, "unmerged": None, "merged": None}
    out["base"] = _tokens_per_second(load_causal_lm(base_path, dtype=dtype), tok, new_tokens, repeats)
    if model_folder is None:
        return out
    if not is_adapter(model_folder):
        out["merged"] = _tokens_per_second(load_causal_lm(model_folder, dtype=dtype), tok, new_tokens, repeats)
        return out
    with LOADING:
        peft_model = PeftModel.from_pretrained(load_causal_lm(base_path, dtype=dtype), model_folder).to(device()).eval()
    out["unmerged"] = _tokens_per_second(peft_model, tok, new_tokens, repeats)
    if adapter_type(model_folder) not in PROMPT_TYPES:
        out["merged"] = _tokens_per_second(peft_model.merge_and_unload(), tok, new_tokens, repeats)
    return out


# ----------------------------------------------------------------------------- the table


def _scores(results: dict) -> tuple[str | None, dict[str, float]]:
    """(stage, language -> mean over benchmarks of acc_norm, or acc) of the last model evaluated."""
    stage = next((s for s in ("aligned", "sft", "base") if s in results.get("stages", [])), None)
    per: dict[str, list[float]] = {}
    for b in results.get("benchmarks", {}).values():
        for lang, models in b.get("languages", {}).items():
            m = models.get(stage) or {}
            value = m.get("acc_norm", m.get("acc"))
            if value is not None:
                per.setdefault(lang, []).append(float(value))
    return stage, {lang: round(sum(v) / len(v), 4) for lang, v in sorted(per.items())}


def sweep_rows(runs: list[dict[str, Any]], train_stage: str) -> list[dict[str, Any]]:
    """One row per run. A run is {label, overrides, pipeline, error, inference}; its training
    numbers come from the artifact of `train_stage`, its scores from the evaluate artifact."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {"variant": r["label"], "overrides": r["overrides"], "error": r.get("error")}
        pipe = r.get("pipeline")
        if pipe is not None:  # a variant that failed later still has what it finished
            fps = pipe.fingerprints()
            if train_stage in pipe.nodes and pipe.store.state(train_stage, fps[train_stage]) == "cached":
                art = pipe.store.open(train_stage, fps[train_stage])
                m = art.metrics
                e = m.get("efficiency", {})
                row.update({
                    "method": m.get("method"),
                    "train_wall_s": m.get("wall_seconds", e.get("wall_seconds")),
                    "train_tokens_per_s": e.get("tokens_per_second"),
                    "train_flops": e.get("flops"),
                    # CUDA: the stage's peak; CPU: its peak resident memory above what the process held
                    # when it began (a sweep runs every variant in one process)
                    "peak_memory_bytes": e.get("peak_cuda_bytes") or (
                        m["peak_rss_bytes"] - m["rss_start_bytes"] if "rss_start_bytes" in m else m.get("peak_rss_bytes")),
                    "trainable_params": m.get("trainable_params"),
                    "total_params": m.get("total_params"),
                    # the weights saved (adapter or whole model), not the tokenizer copied beside them
                    "saved_bytes": sum(f["size"] for rel, f in art.files.items()
                                       if rel.startswith("model/") and rel.endswith(".safetensors")),
                })
            evals = [n for n in pipe.order if pipe.nodes[n].type == "evaluate"]
            if evals and pipe.store.state(evals[-1], fps[evals[-1]]) == "cached":
                stage, scores = _scores(pipe.store.open(evals[-1], fps[evals[-1]]).read_json("results.json"))
                row["scored_model"] = stage
                row["scores"] = scores
                if scores:
                    row["score_mean"] = round(sum(scores.values()) / len(scores), 4)
        inf = r.get("inference") or {}
        row.update({f"gen_tok_s_{k}": v for k, v in inf.items()})
        rows.append(row)
    return rows


def _score(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}" if abs(x) < 10 else f"{x:,.1f}"


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    langs = sorted({lang for r in rows for lang in (r.get("scores") or {})})
    head = (["variant"] + [f"score {lang}" for lang in langs] + ["score mean", "train wall (s)", "train tokens/s",
            "train FLOPs", "peak memory added", "trainable params", "weight bytes", "gen tok/s base", "gen tok/s unmerged",
            "gen tok/s merged"])
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    head.append("note")
    lines[2] = "| " + " | ".join(head) + " |"
    lines[3] = "|---|" + "---:|" * (len(head) - 2) + "---|"
    for r in rows:
        error = r.get("error") or ""
        note = f"failed: {error[:200]}{'...' if len(error) > 200 else ''}" if error else ""
        cells = [r["variant"]] + [_score((r.get("scores") or {}).get(lang)) for lang in langs] + [
            _score(r.get("score_mean")), _score(r.get("train_wall_s")), _score(r.get("train_tokens_per_s")),
            num(r.get("train_flops")), num(r.get("peak_memory_bytes"), "B"), num(r.get("trainable_params")),
            num(r.get("saved_bytes"), "B"), _score(r.get("gen_tok_s_base")), _score(r.get("gen_tok_s_unmerged")),
            _score(r.get("gen_tok_s_merged")), note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    scored = {str(r["scored_model"]) for r in rows if r.get("scored_model")}
    lines += ["", f"Scores: mean over the benchmarks of acc_norm (acc where a benchmark has none) of the "
              f"{'/'.join(sorted(scored)) or 'n/a'} model, per language. Training numbers: the trained stage's "
              "artifact (wall time over every attempt, tokens that are not padding, FLOPs estimated by the "
              "Trainer, peak CUDA memory or peak resident memory above the process's at the stage's start; the "
              "bytes of the saved weights: the adapter, or the whole model). Generation: greedy, fixed prompts, tokens/s of the base "
              "model alone, with the adapter unmerged, and merged."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Two panels: mean score against training wall time (marker area ~ saved bytes), and
    generation tokens/s base / unmerged / merged per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("train_wall_s") is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    biggest = max((r.get("saved_bytes") or 1 for r in ok), default=1)
    for r in ok:
        x, y = r.get("train_wall_s"), r.get("score_mean")
        if x is None or y is None:
            continue
        left.scatter([x], [y], s=40 + 400 * (r.get("saved_bytes") or 0) / biggest, alpha=0.6)
        left.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    left.set_xlabel("training wall time (s)")
    left.set_ylabel("mean score over languages")
    left.set_title("quality vs training time (marker area: weight bytes)")
    width = 0.27
    for k, (key, name) in enumerate((("base", "base"), ("unmerged", "adapter unmerged"), ("merged", "merged"))):
        values = [r.get(f"gen_tok_s_{key}") or 0 for r in ok]
        right.bar([i + (k - 1) * width for i in range(len(ok))], values, width, label=name)
    right.set_xticks(range(len(ok)))
    right.set_xticklabels([r["variant"] for r in ok], rotation=30, ha="right", fontsize=8)
    right.set_ylabel("generation tokens/s")
    right.set_title("inference cost of the adapter")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], out: Path, title: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "sweep.md", "json": out / "sweep.json", "plot": out / "sweep.png"}
    paths["markdown"].write_text(markdown(rows, title), encoding="utf-8")
    paths["json"].write_text(json.dumps({"title": title, "rows": rows}, indent=2), encoding="utf-8")
    plot(rows, paths["plot"], title)
    return paths
