"""The evaluation report: leaderboard rows, markdown tables and plots.

Works only from the `results.json` it is given (see `evaluate.collect` for its shape), so the
CLI (`polyalign report`), the Prefect flow (table artifact) and the evaluate stage share it
without importing the stage.
"""

from __future__ import annotations

import math
from pathlib import Path


def leaderboard_rows(results: dict) -> list[dict]:
    """One flat row per benchmark, language (and macro) and stage: for tables and the CLI."""
    rows = []
    for name, b in results["benchmarks"].items():
        for lang, models in list(b["languages"].items()) + [("macro", b["macro"])]:
            for stage in results["stages"]:
                m = models.get(stage)
                if m:
                    rows.append({
                        "benchmark": name, "language": lang, "stage": stage,
                        **{k: round(m[k], 4) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr") if m.get(k) is not None},
                        "n": m.get("n", m.get("languages")),
                    })
    for kind in ("translation", "responses"):
        for lang, r in (results.get(kind) or {}).items():
            for stage, m in r.get("models", {}).items():
                rows.append({"benchmark": kind, "language": lang, "stage": stage, **{k: round(v, 4) for k, v in m.items() if isinstance(v, float)}, "n": m.get("n")})
    return rows


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(results: dict) -> str:
    """Tables of languages x stages x metrics, one per benchmark, then translation and responses."""
    stages = results["stages"]
    parts = []
    for name, b in results["benchmarks"].items():
        head = "| language | " + " | ".join(f"{s} acc | {s} acc_norm" for s in stages) + " |"
        lines = [f"### {name}", "", head, "|---|" + "---:|" * (2 * len(stages))]
        for lang, models in b["languages"].items():
            cells = []
            for s in stages:
                m = models.get(s)
                cells += [f"{_fmt(m['acc'])} ± {_fmt(m['acc_stderr'])}", f"{_fmt(m['acc_norm'])} ± {_fmt(m['acc_norm_stderr'])}"] if m else ["n/a", "n/a"]
            n = next(iter(models.values()))["n"]
            lines.append(f"| {lang} (n={n}) | " + " | ".join(cells) + " |")
        if b["macro"]:
            cells = []
            for s in stages:
                m = b["macro"].get(s)
                cells += [f"**{_fmt(m['acc'])}**", f"**{_fmt(m['acc_norm'])}**"] if m else ["n/a", "n/a"]
            lines.append("| **macro** | " + " | ".join(cells) + " |")
        if b["missing"]:
            lines += ["", "Not evaluated:"] + [f"- {lang}: {why}" for lang, why in b["missing"].items()]
        parts.append("\n".join(lines))
    for kind, metrics in (("translation", ("bleu", "chrf++")), ("responses", ("reward_mean", "judge_rating", "win_rate_vs_base"))):
        block = results.get(kind)
        if not block:
            continue
        present = [k for k in metrics if any(k in m for r in block.values() for m in r.get("models", {}).values())]
        if not present:
            present = list(metrics[:1])
        head = "| language | " + " | ".join(f"{s} {k}" for s in stages for k in present) + " |"
        lines = [f"### {kind}", "", head, "|---|" + "---:|" * (len(stages) * len(present))]
        for lang, r in block.items():
            if "models" not in r:
                lines.append(f"| {lang} | " + " | ".join(["—"] * (len(stages) * len(present))) + f" |  <!-- {r.get('missing') or r.get('skipped')} -->")
                continue
            cells = [_fmt(r["models"].get(s, {}).get(k), 2) for s in stages for k in present]
            lines.append(f"| {lang} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot(name: str, bench: dict, stages: list[str], target: Path) -> None:
    """Per-language bars of acc (solid) and acc_norm (hatched), stages side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = list(bench["languages"]) + (["macro"] if bench["macro"] else [])
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.3 * len(langs) * max(1, len(stages)) / 1.5 + 2), 4.2), sharey=True)
    width = 0.8 / max(1, len(stages))
    colors = ["#9aa5b1", "#3b82f6", "#f59e0b", "#10b981"]
    for ax, metric in zip(axes, ("acc", "acc_norm")):
        for k, stage in enumerate(stages):
            xs, ys, errs = [], [], []
            for j, lang in enumerate(langs):
                m = bench["macro"].get(stage) if lang == "macro" else bench["languages"][lang].get(stage)
                if not m:
                    continue
                xs.append(j + (k - (len(stages) - 1) / 2) * width)
                ys.append(m[metric])
                err = m.get(f"{metric}_stderr")
                errs.append(err or 0.0)
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=stage, color=colors[k % len(colors)])
        ax.set_xticks(range(len(langs)), langs)
        ax.set_title(metric)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
        chance = bench.get("chance")  # mean 1/number-of-choices, set by finish()
        if chance:
            ax.axhline(chance, color="black", linestyle="--", linewidth=0.8)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(title="stage", loc="upper right", fontsize=8)
    fig.suptitle(f"{name}: accuracy per language (error bars: standard error; dashed: chance)")
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
