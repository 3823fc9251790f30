"""Time polyalign's multiple-choice evaluation against lm-evaluation-harness on the same requests.

Baseline: lm-evaluation-harness 0.4.13 (`HFLM`, `simple_evaluate`) running the task that
`lmeval_export.write_task` writes for the same benchmark setting (Okapi m_arc, `lm-eval`
protocol), with the same model, documents, contexts and batch size, in the same process.
The batch size defaults to 8 at 0-shot and 1 with shots: on CPU each is lm-eval's faster
setting (its padded batches of 2K-token requests with full-vocabulary log-softmax are slower
than one request at a time); `--batch-size N` sets it for every case, both sides.
Ours: the evaluate stage's path, `evaluate_benchmark(ChoiceScorer, settings, lang)`.

Three cases:
  0-shot          no shots (report only, no target);
  25-shot random  shots drawn per document (lm-eval's default sampler)   target >= 3x;
  25-shot first_n one shot set for all documents (lm-eval's `first_n` sampler,
                  our `shot_sampling: first_n`; its shared prefix is encoded once)  target >= 20x.
A case passes when it meets its speed-up target *and* the numbers are identical: every
per-choice log-likelihood within 1e-4 of lm-eval's, per-document acc and acc_norm (hence
the aggregates) equal.

Only scoring is timed: both models are loaded once beforehand (lm-eval's HFLM loads its own
copy from the same folder), float32 on CPU. lm-eval's time is one `simple_evaluate` call with
the pre-built HFLM (task loading and request building included); ours is one
`evaluate_benchmark` call (reading rows, building contexts, tokenizing, scoring, metrics).
Both sides are warmed once on one document per case before timing (0-shot requests, which
also fill the data caches: HF datasets on lm-eval's side, the row cache on ours).

    .venv/bin/python bench/eval_speed.py                 # SmolLM2-135M-Instruct, fr, ~5 min on 2 CPU cores
    .venv/bin/python bench/eval_speed.py --tiny          # tiny random model, 5 shots: smoke run, ~15 s
    .venv/bin/python bench/eval_speed.py --model PATH --lang de --docs-random 20 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "okapi_eval" / "m_arc"
LL_TOLERANCE = 1e-4

# (key, label, shots, shot sampling, default batch size, speed-up target or None)
CASES = [
    ("zero", "0-shot", 0, "random", 8, None),
    ("random", "{k}-shot, per-document shots", None, "random", 1, 3.0),
    ("first_n", "{k}-shot, fixed shots (first_n)", None, "first_n", 1, 20.0),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="a local Hugging Face model folder (default: prepared smollm2-135m-instruct)")
    which.add_argument("--tiny", action="store_true", help="a tiny random model built locally (fast smoke run)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with Okapi m_arc {lang}_{split}.json files (default: %(default)s)")
    p.add_argument("--lang", default="fr", help="language (default: %(default)s)")
    p.add_argument("--shots", type=int, default=None, help="shots of the few-shot cases (default: 25; 5 with --tiny, whose 2048-token window 25 French shots overflow)")
    p.add_argument("--docs-zero", type=int, default=60, help="documents of the 0-shot case (default: %(default)s)")
    p.add_argument("--docs-random", type=int, default=10, help="documents of the per-document-shots case (default: %(default)s)")
    p.add_argument("--docs-fixed", type=int, default=12, help="documents of the fixed-shots case (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=None,
        help="batch size of both sides, every case: HFLM requests, ChoiceScorer documents (default: 8 at 0-shot, 1 with shots, "
        "lm-eval's faster setting on CPU for each: its padded 2K-token batches with full-vocabulary logits are slower than one by one)",
    )
    p.add_argument("--cases", default="zero,random,first_n", help="comma-separated subset of zero,random,first_n (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's progress bars and warnings")
    args = p.parse_args(argv)
    if args.shots is None:
        args.shots = 5 if args.tiny else 25
    unknown = set(args.cases.split(",")) - {c[0] for c in CASES}
    if unknown:
        p.error(f"--cases: unknown case(s) {', '.join(sorted(unknown))}")
    return args


def offline_env(tmp: str) -> None:
    """No network, and lm-eval's dataset cache in a scratch folder (set before importing it)."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.environ["HF_DATASETS_CACHE"] = os.path.join(tmp, "hf_datasets")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def model_path(args: argparse.Namespace) -> tuple[str, str]:
    """(folder, short name) of the model to benchmark."""
    from polyalign.stages.core.model_specs import ModelSpec, TinySpec, models_dir
    from polyalign.stages.core.prepare import ensure_model

    if args.model:
        folder = Path(args.model).expanduser()
        if not (folder / "config.json").is_file():
            sys.exit(f"eval_speed: {folder} is not a Hugging Face model folder (no config.json)")
        return str(folder), folder.name
    if args.tiny:
        return ensure_model(ModelSpec(tiny=TinySpec()), models_dir()), "tiny"
    return ensure_model(ModelSpec(prepared="smollm2-135m-instruct"), models_dir()), "smollm2-135m-instruct"


def case_settings(source: str, lang: str, shots: int, sampling: str, limit: int):  # noqa: ANN201
    """The evaluate stage's resolved settings of an m_arc benchmark under the lm-eval preset."""
    from polyalign.stages.evaluate import Config, settings

    bench = {"task": "arc", "source": source, "shots": shots, "shot_sampling": sampling}
    cfg = Config(model="base", languages=[lang], preset="lm-eval", benchmarks={"m_arc": bench}, limit=limit)
    return settings(cfg, "m_arc", lang)


def run_lmeval(lm, name: str, folder: Path, shots: int, limit: int, verbose: bool) -> tuple[dict, float]:  # noqa: ANN001
    import lm_eval
    from lm_eval.tasks import TaskManager

    # lm-eval's progress bars are always on; they go to a sink unless --verbose
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sys.stderr if verbose else sink):
        start = time.perf_counter()
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=shots, limit=limit, task_manager=manager, log_samples=True)
        elapsed = time.perf_counter() - start
    return out, elapsed


def run_ours(model, tok, s, lang: str, batch_size: int):  # noqa: ANN001, ANN201
    from polyalign.stages.core.scoring import ChoiceScorer
    from polyalign.stages.evaluate import evaluate_benchmark

    scorer = ChoiceScorer(model, tok, batch_size, progress=False)
    start = time.perf_counter()
    docs, metrics = evaluate_benchmark(scorer, s, lang)
    return docs, metrics, scorer, time.perf_counter() - start


def compare(name: str, out: dict, docs, metrics: dict, contexts: list[str]) -> dict:  # noqa: ANN001
    """Per-choice log-likelihoods, per-document acc/acc_norm and aggregates of both sides."""
    from polyalign.stages.core.lmeval_export import samples_by_doc

    ref = samples_by_doc(out, name)
    preds = metrics["predictions"]
    if len(ref) != len(preds):
        return {"docs_lmeval": len(ref), "docs_ours": len(preds), "max_abs_dll": math.inf, "acc_equal": False, "acc_norm_equal": False, "contexts_equal": 0}
    pairs = [(a, b) for p, r in zip(preds, ref) for a, b in zip(p["loglikelihoods"], r["loglikelihoods"], strict=True)]
    dll = max((abs(a - b) for a, b in pairs), default=0.0)
    rel = max((abs(a - b) / max(abs(b), 1e-30) for a, b in pairs), default=0.0)
    acc_docs = all(float(p["pred"] == p["gold"]) == r["acc"] for p, r in zip(preds, ref))
    norm_docs = all(float(p["pred_norm"] == p["gold"]) == r["acc_norm"] for p, r in zip(preds, ref))
    agg = out["results"][name]
    return {
        "contexts_equal": sum(c == r["context"] for c, r in zip(contexts, ref)),
        "max_abs_dll": dll,
        "max_rel_dll": rel,
        "acc_ours": metrics["acc"],
        "acc_lmeval": agg["acc,none"],
        "acc_norm_ours": metrics["acc_norm"],
        "acc_norm_lmeval": agg["acc_norm,none"],
        "acc_equal": acc_docs and metrics["acc"] == agg["acc,none"],
        "acc_norm_equal": norm_docs and metrics["acc_norm"] == agg["acc_norm,none"],
    }


def common_length(a: list[int], b: list[int]) -> int:
    k, m = 0, min(len(a), len(b))
    while k < m and a[k] == b[k]:
        k += 1
    return k


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = Path(args.data).expanduser()
    for split in ("test", "train"):
        if not (data / f"{args.lang}_{split}.json").is_file():
            sys.exit(f"eval_speed: no m_arc data: {data / f'{args.lang}_{split}.json'} is missing (see --data)")
    source = str(data.resolve() / "{lang}_{split}.json")

    tmp_holder = tempfile.TemporaryDirectory(prefix="eval_speed_")
    tmp = Path(tmp_holder.name)
    offline_env(str(tmp))

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from polyalign.stages.core.benchmarks import prepare
    from polyalign.stages.core.lmeval_export import write_task
    from polyalign.stages.core.loading import load_causal_lm, load_tokenizer

    for noisy in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()

    path, model_name = model_path(args)
    t0 = time.perf_counter()
    lm = HFLM(pretrained=path, device="cpu", dtype="float32", batch_size=args.batch_size or 1)
    model, tok = load_causal_lm(path, dtype="float32"), load_tokenizer(path)
    load_s = time.perf_counter() - t0
    model.to("cpu")

    print(
        f"eval_speed: m_arc {args.lang} test (shots from train), model {model_name} (float32, cpu, {torch.get_num_threads()} threads), "
        f"same batch size on both sides ({f'{args.batch_size}' if args.batch_size else '8 at 0-shot, 1 with shots'}); models loaded in {load_s:.1f} s (not timed)"
    )
    print(f"baseline: lm-evaluation-harness {lm_eval.__version__} HFLM + simple_evaluate; ours: polyalign evaluate_benchmark (ChoiceScorer)")

    wanted = args.cases.split(",")
    doc_counts = {"zero": args.docs_zero, "random": args.docs_random, "first_n": args.docs_fixed}
    results = []
    load_before = os.getloadavg()[0]
    for key, label, shots, sampling, batch_size, target in CASES:
        if key not in wanted:
            continue
        batch_size = args.batch_size or batch_size
        lm.batch_size_per_gpu = batch_size  # HFLM reads it per call
        shots = 0 if shots == 0 else args.shots
        label = label.format(k=shots)
        n = doc_counts[key]
        s = case_settings(source, args.lang, shots, sampling, n)
        name = f"eval_speed_{args.lang}_{key}"
        folder = tmp / "tasks" / key
        write_task(name, s, args.lang, folder)

        # warm-up: one document, 0-shot requests (fills the data caches, starts the thread pools)
        warm = case_settings(source, args.lang, shots, sampling, 1)
        prepare(warm, args.lang)  # reads the shot split too
        warm.shots = 0
        run_lmeval(lm, name, folder, 0, 1, args.verbose)
        run_ours(model, tok, warm, args.lang, batch_size)

        print(f"  {label}: {n} documents ...", end="", flush=True)
        out, lm_s = run_lmeval(lm, name, folder, shots, n, args.verbose)
        docs, metrics, scorer, our_s = run_ours(model, tok, s, args.lang, batch_size)
        _, contexts, prefix = prepare(s, args.lang)
        check = compare(name, out, docs, metrics, contexts)
        requests = sum(len(d.choices) for d in docs)
        ctx_ids = [scorer.encode(c, " " + d.choices[0])[0] for c, d in zip(contexts, docs)]
        ctx_tokens = [len(x) for x in ctx_ids]
        prefix_ids = scorer._ids(prefix) if prefix else []
        common = min((common_length(prefix_ids, x) for x in ctx_ids), default=0) if prefix_ids else 0
        speedup = lm_s / our_s if our_s else math.inf
        same = check["max_abs_dll"] <= LL_TOLERANCE and check["acc_equal"] and check["acc_norm_equal"]
        row = {
            "case": key,
            "label": label,
            "shots": shots,
            "shot_sampling": sampling,
            "docs": len(docs),
            "batch_size": batch_size,
            "requests": requests,
            "context_tokens_mean": sum(ctx_tokens) / len(ctx_tokens),
            "shared_prefix_tokens": len(prefix_ids),
            "prefix_tokens_common_to_contexts": common,
            "lmeval_s": lm_s,
            "polyalign_s": our_s,
            "speedup": speedup,
            "target": target,
            "identical": same,
            "pass": (target is None or speedup >= target) and same,
            "scorer_paths": dict(scorer.stats),
            "scorer_tokens": scorer.tokens,
            **check,
        }
        results.append(row)
        print(f" lm-eval {lm_s:.1f} s, polyalign {our_s:.1f} s")

    yes = lambda b: "yes" if b else "NO"  # noqa: E731
    header = f"{'case':<34} | {'docs':>4} | {'requests':>8} | {'lm-eval s':>9} | {'polyalign s':>11} | {'speed-up':>8} | {'max |Δll|':>9} | {'acc equal':>9} | {'acc_norm equal':>14} | {'target':>6} | result"
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        target = f">={r['target']:g}x" if r["target"] else "-"
        result = ("PASS" if r["pass"] else "MISS") if r["target"] else ("ok" if r["identical"] else "MISS")
        print(
            f"{r['label']:<34} | {r['docs']:>4} | {r['requests']:>8} | {r['lmeval_s']:>9.1f} | {r['polyalign_s']:>11.1f} | "
            f"{r['speedup']:>7.1f}x | {r['max_abs_dll']:>9.1e} | {yes(r['acc_equal']):>9} | {yes(r['acc_norm_equal']):>14} | {target:>6} | {result}"
        )
    print()
    for r in results:
        print(
            f"{r['label']}: contexts identical {r['contexts_equal']}/{r['docs']}, mean context {r['context_tokens_mean']:.0f} tokens"
            + (f" (shared prefix {r['shared_prefix_tokens']} tokens alone, {r['prefix_tokens_common_to_contexts']} common to every context)" if r["shared_prefix_tokens"] else "")
            + f"; acc {r.get('acc_ours', math.nan):.4f} vs {r.get('acc_lmeval', math.nan):.4f}, acc_norm {r.get('acc_norm_ours', math.nan):.4f} vs {r.get('acc_norm_lmeval', math.nan):.4f}"
            + f"; batch size {r['batch_size']}; scorer paths {r['scorer_paths']}, {r['scorer_tokens']} tokens run"
        )
        if r["shared_prefix_tokens"] and not r["scorer_paths"]["prefixed"]:
            print(f"  WARNING: the shared prefix was not used: tokenized alone it differs from the contexts' tokens "
                  f"after {r['prefix_tokens_common_to_contexts']} of {r['shared_prefix_tokens']} tokens, so every context was run in full")
    load_after = os.getloadavg()[0]
    print(f"load average (1 min) before/after the timed runs: {load_before:.2f} / {load_after:.2f} on {os.cpu_count()} cores "
          f"(this run keeps about {torch.get_num_threads()} busy; more means other processes shared the CPU: noisy timings)")
    print(f"parity: per-choice log-likelihoods within {LL_TOLERANCE:g}, per-document acc and acc_norm equal -> "
          + ("all identical" if all(r["identical"] for r in results) else "DIFFERENCES (see table)"))

    if args.json:
        payload = {
            "model": model_name,
            "model_path": path,
            "lang": args.lang,
            "data": str(data),
            "load_average_1min": {"before": load_before, "after": load_after},
            "threads": torch.get_num_threads(),
            "dtype": "float32",
            "device": "cpu",
            "versions": {"lm_eval": lm_eval.__version__, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
            "ll_tolerance": LL_TOLERANCE,
            "cases": results,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    tmp_holder.cleanup()


if __name__ == "__main__":
    main()
