"""Peak memory of translate and preferences against the size of their input.

For each size (5K and 50K records by default) a synthetic Self-Instruct artifact is written
into a scratch store (English instruction records of realistic length, 10% held out), then
in a fresh process each:
- `translate` runs for real on it into two languages with backend mt and a tiny random
  NLLB-layout model (tests/tiny_seq2seq.py; 4 new tokens per paragraph, so the time goes to
  reading, masking, batching and writing rather than to a big model);
- `preferences` runs for real on the translate artifact with a tiny policy (a LoRA adapter
  on a tiny random Llama) and judge: 8 prompts per language, 2 responses each;
- the baseline, `load all`: what both stages did before streaming, every record of the
  input read into a list and sorted by id.
Each process reports the peak of its resident set size while the stage runs (sampled from
/proc every 10 ms, after torch and transformers are imported). The bound checked: the peak of translate and
of preferences at the largest size is within 64 MB of their peak at the smallest, i.e. it
does not grow with the number of records, while the baseline's does.

    .venv/bin/python bench/stream_memory.py [--sizes 5000 50000]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BOUND_MB = 64
WORDS = ("the a river city model data report summary question answer student teacher market price "
         "write explain describe compare list give three reasons why how when where small large quickly "
         "carefully history science music garden kitchen travel budget health sleep morning evening").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_source(store_root: Path, n: int) -> str:
    """A committed self_instruct-like artifact of `n` records; returns its fingerprint."""
    from polyalign.stages.core.store import Store

    rng = random.Random(n)
    fp = f"synthetic-{n}"
    writer = Store(store_root).writer("self_instruct", fp)
    per_file = 1000
    for k in range(0, n, per_file):
        rows = (
            {
                "id": f"r{i:07d}",
                "instruction": _sentence(rng, rng.randint(8, 24)),
                "input": _sentence(rng, rng.randint(0, 30)) if rng.random() < 0.4 else "",
                "output": " ".join(_sentence(rng, rng.randint(6, 20)) for _ in range(rng.randint(2, 6))),
                "split": "heldout" if rng.random() < 0.1 else "train",
            }
            for i in range(k, min(n, k + per_file))
        )
        writer.write_jsonl(f"data/{k // per_file:05d}.jsonl", rows)
    writer.commit({"stage": "self_instruct"})
    return fp


def _inputs(store_root: Path, arts: dict[str, tuple[str, str]], models: dict[str, object]):
    from polyalign.stages.core.contract import Inputs
    from polyalign.stages.core.prepare import ensure_model
    from polyalign.stages.core.store import Store

    store = Store(store_root)
    artifacts = {name: store.open(stage, fp) for name, (stage, fp) in arts.items()}
    root = store_root.parent / "models"
    return Inputs(
        artifacts,
        model_path=lambda name: ensure_model(models[name], root),  # type: ignore[arg-type]
        model_dtype=lambda name: "float32",
        model_spec=lambda name: models[name],  # type: ignore[return-value]
    )


class RssSampler:
    """The highest resident set size seen while it runs, read from /proc every 10 ms (the
    process's own high-water mark would include the import of torch, which hides what the
    stage itself holds)."""

    def __init__(self) -> None:
        import threading

        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def child(args: argparse.Namespace) -> None:
    """One measured process: prints {"peak_mb": ..., "seconds": ...} as its last line."""
    import torch  # noqa: F401  (imported before sampling starts: not the stage's memory)
    import transformers  # noqa: F401

    from polyalign.stages.core.model_specs import ModelSpec, TinySpec
    from polyalign.stages.core.store import Store

    store_root = Path(args.store)
    n = args.size
    sampler = RssSampler()
    start = time.perf_counter()
    models = {"mt": ModelSpec(path=str(Path(args.store).parent / "nllb")), "tiny": ModelSpec(tiny=TinySpec(seed=3))}
    if args.child == "load_all":
        art = Store(store_root).open("self_instruct", f"synthetic-{n}")
        rows = sorted(art.records("data/*.jsonl"), key=lambda r: r["id"])
        assert len(rows) == n
    elif args.child == "translate":
        from polyalign.stages import translate
        from polyalign.stages.core.contract import run_module

        cfg = translate.Config(model="mt", languages=["fr", "de"], backend="mt", max_new_tokens=4, shard_size=256,
                               batch_size=64, checks=[], keep_truncated=True, fertility_model="tiny")
        inputs = _inputs(store_root, {"data": ("self_instruct", f"synthetic-{n}")}, models)
        out = Store(store_root).writer("translate", f"synthetic-{n}")
        run_module(translate, cfg, inputs, out)
        out.commit({"stage": "translate"})
        assert out.metrics["translated"]["fr"] + out.metrics["quarantined"]["fr"] == n
    else:
        from polyalign.stages import preferences
        from polyalign.stages.core.contract import run_module

        cfg = preferences.Config(model="tiny", judge="tiny", prompts_per_language=8, num_responses=2, max_new_tokens=8,
                                 min_margin=0.0, chunk_size=8, batch_size=8)
        inputs = _inputs(store_root, {"data": ("translate", f"synthetic-{n}"), "policy": ("sft", "tiny-adapter")}, models)
        out = Store(store_root).writer("preferences", f"synthetic-{n}")
        run_module(preferences, cfg, inputs, out)
        assert sum(out.metrics["pairs"].values()) + sum(out.metrics.get("quarantined", {}).values()) > 0
    peak = sampler.stop()
    high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({"peak_mb": round(peak, 1), "high_water_mb": round(high_water, 1), "seconds": round(time.perf_counter() - start, 1)}))


def _adapter(store_root: Path) -> None:
    """A committed sft-like artifact holding a LoRA adapter on the tiny policy (untrained)."""
    from peft import LoraConfig, get_peft_model

    from polyalign.stages.core.loading import load_causal_lm
    from polyalign.stages.core.model_specs import ModelSpec, TinySpec
    from polyalign.stages.core.prepare import ensure_model
    from polyalign.stages.core.store import Store

    path = ensure_model(ModelSpec(tiny=TinySpec(seed=3)), store_root.parent / "models")
    model = get_peft_model(load_causal_lm(path), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    writer = Store(store_root).writer("sft", "tiny-adapter")
    model.save_pretrained(str(writer.path("model")))
    writer.commit({"stage": "sft"})


def run_child(kind: str, store: Path, size: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--store", str(store), "--size", str(size)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} at {size} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--child", choices=["load_all", "translate", "preferences"])
    parser.add_argument("--store")
    parser.add_argument("--size", type=int)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from tests.tiny_seq2seq import build_nllb

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        build_nllb(Path(tmp) / "nllb")
        import os

        os.environ["POLYALIGN_MODELS"] = str(Path(tmp) / "models")
        _adapter(store)
        results = {}
        for n in args.sizes:
            t = time.perf_counter()
            write_source(store, n)
            print(f"{n} records written in {time.perf_counter() - t:.1f} s", flush=True)
            results[n] = {kind: run_child(kind, store, n) for kind in ("load_all", "translate", "preferences")}
            print(f"  {n:>7} records: " + ", ".join(f"{k} {v['peak_mb']:.0f} MB ({v['seconds']:.0f} s)" for k, v in results[n].items()), flush=True)
    small, big = min(args.sizes), max(args.sizes)
    print(f"\npeak RSS, {small} -> {big} records (x{big / small:.0f}):")
    verdict = True
    for kind in ("load_all", "translate", "preferences"):
        a, b = results[small][kind]["peak_mb"], results[big][kind]["peak_mb"]
        line = f"  {kind:<12} {a:7.0f} MB -> {b:7.0f} MB  (+{b - a:.0f} MB, x{b / a:.2f})"
        if kind != "load_all":
            ok = b - a <= BOUND_MB
            verdict &= ok
            line += f"  {'PASS' if ok else 'FAIL'} (bound: +{BOUND_MB} MB)"
        else:
            line += "  (baseline: every record in a list)"
        print(line)
    print("PASS" if verdict else "FAIL")


if __name__ == "__main__":
    main()
