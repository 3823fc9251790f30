"""Chaos bench: kill a pipeline run (SIGKILL to its whole process group) at random moments,
rerun after each kill, and compare every artifact with an uninterrupted run.

    .venv/bin/python bench/chaos.py configs/tiny.yaml --kills 50 [--seed 0] [--work DIR] [--set F=V ...]

1. Reference: `polyalign run CONFIG` into a fresh store, uninterrupted. The bench polls the
   store while it runs and keeps each stage's window (its work folder appears -> it is cached)
   and the start-up time before the first stage.
2. Chaos, in rounds: a fresh store; `polyalign run` in its own process group, killed inside a
   chosen stage so that the kills spread evenly over the stages: the target is, among the
   stages not yet cached in this round and killed fewer than twice in it, the one with the
   fewest kills so far (the earliest on a tie). When that one has more kills than the stage
   with the fewest (an earlier stage, already cached in this round), the round's run goes on
   to the end and a fresh round starts, so no stage collects kills just because rounds end
   with it. Once the run works on the target (its flow has begun, every stage before it is
   cached, its work folder exists), the kill comes after a seeded uniform share of the time
   the stage had left in the reference run (the whole window on a fresh start, the window less
   the time already spent in it on a resumed one). The stage that was not yet cached at the
   kill is the one counted. After each kill the run starts again; once a run finishes the
   round's store is compared and the next round starts, until `--kills` kills. `--stages`
   limits the targets (for a long config: the training stages, say).
3. Comparison, per stage and round: the fingerprint, then
   - data files (`*.jsonl` and `*.json` outside `model/`, but not the run statistics: metrics,
     the training log and marker, the units' timings): record ids and counts, and the sha256
     of every file (byte-identical, or a mismatch);
   - model weights (`model/**.safetensors`): the largest absolute difference of any tensor
     (float nondeterminism of a resumed training run shows here; a mismatch only above
     `--weights-atol`).
Prints kills per stage, resumes, runs that finished before their kill, and mismatches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_STAGE = 2  # kills per stage per round; then the round's run goes through it (no stage is killed forever)
sys.path.insert(0, str(ROOT))


def _pipeline(config: str, sets: list[str], store: str):  # noqa: ANN202
    from polyalign.stages.core.pipeline import load_pipeline

    return load_pipeline(config, sets, store=store)


def _start(config: str, sets: list[str], store: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "polyalign", "run", config, "--store", store]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _states(pipe) -> dict[str, str]:  # noqa: ANN001
    fps = pipe.fingerprints()
    return {s: pipe.store.state(s, fps[s]) for s in pipe.order}


def reference(config: str, sets: list[str], store: str, log: Path) -> dict:
    """Run uninterrupted; return the start-up time and each stage's window (seconds)."""
    pipe = _pipeline(config, sets, store)
    fps = pipe.fingerprints()
    start = time.monotonic()
    proc = _start(config, sets, store, log)
    began: dict[str, float] = {}
    ended: dict[str, float] = {}
    while proc.poll() is None:
        now = time.monotonic() - start
        for s in pipe.order:
            if s not in began and (pipe.store.partial_dir(s, fps[s]).exists() or pipe.store.has_final(s, fps[s])):
                began[s] = now
            if s not in ended and pipe.store.has_final(s, fps[s]):
                ended[s] = now
        time.sleep(0.1)
    if proc.returncode:
        sys.exit(f"chaos: the reference run failed (exit {proc.returncode}); see {log}")
    total = time.monotonic() - start
    first = min(began.values(), default=0.0)
    windows = {}
    for s in pipe.order:  # a stage's window: from its work folder's appearance (the kill is armed) to its end
        before = max([first] + [ended[p] for p in pipe.order[: pipe.order.index(s)] if p in ended])
        windows[s] = max(0.05, ended.get(s, total) - max(began.get(s, before), before))
    return {"startup": first, "windows": windows, "total": total}


# files of run statistics (wall times, attempts, the Trainer's log), not data: they differ
# between any two runs and are left out of the comparison (as are units' `_units/*.json`)
STATISTICS = ("metrics.json", "train_log.json", "train_result.json")


def _files(art) -> dict[str, dict]:  # noqa: ANN001
    return dict(art.manifest.get("files", {}))


def _ids(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(str(row.get("id", hashlib.sha256(line.encode()).hexdigest()[:16])) if isinstance(row, dict) else "?")
    return out


def compare(config: str, sets: list[str], store: str, ref: str, atol: float) -> dict[str, dict]:
    """Per stage: {data_files, records, data_mismatches, max_weight_diff, weight_mismatch}."""
    from safetensors.torch import load_file

    a, b = _pipeline(config, sets, store), _pipeline(config, sets, ref)
    fa, fb = a.fingerprints(), b.fingerprints()
    out = {}
    for s in a.order:
        row = {"fingerprint_equal": fa[s] == fb[s], "data_files": 0, "records": 0, "data_mismatches": [],
               "max_weight_diff": 0.0, "weight_mismatch": False}
        art_a, art_b = a.store.open(s, fa[s], deep=True), b.store.open(s, fb[s], deep=True)
        files_a, files_b = _files(art_a), _files(art_b)
        data = sorted(f for f in set(files_a) | set(files_b) if not f.startswith("model/") and f.endswith((".jsonl", ".json"))
                      and f not in STATISTICS and not f.startswith(("tensorboard/", "units/", "_units/")))
        for f in data:
            row["data_files"] += 1
            if f not in files_a or f not in files_b:
                row["data_mismatches"].append(f"{f}: only in {'chaos' if f in files_a else 'reference'}")
                continue
            if f.endswith(".jsonl"):
                ia, ib = _ids(Path(art_a.path) / f), _ids(Path(art_b.path) / f)
                row["records"] += len(ia)
                if ia != ib:
                    row["data_mismatches"].append(f"{f}: {len(ia)} vs {len(ib)} records or other ids")
                    continue
            if files_a[f]["sha256"] != files_b[f]["sha256"]:
                row["data_mismatches"].append(f"{f}: content differs")
        for f in sorted(f for f in files_a if f.startswith("model/") and f.endswith(".safetensors")):
            if f not in files_b:
                row["weight_mismatch"] = True
                continue
            ta, tb = load_file(str(Path(art_a.path) / f)), load_file(str(Path(art_b.path) / f))
            for k in ta:
                d = float((ta[k].float() - tb[k].float()).abs().max()) if k in tb and ta[k].shape == tb[k].shape else float("inf")
                row["max_weight_diff"] = max(row["max_weight_diff"], d)
        row["weight_mismatch"] = row["weight_mismatch"] or row["max_weight_diff"] > atol
        out[s] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="Folder for the stores and logs (default: a temporary one, removed).")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--weights-atol", type=float, default=1e-5)
    ap.add_argument("--stages", help="Comma-separated stages to kill in (default: every stage).")
    ap.add_argument("--json")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    ref_store = str(work / "reference")
    print(f"chaos: reference run into {ref_store}", flush=True)
    order = _pipeline(a.config, a.sets, ref_store).order
    targets = order if not a.stages else [s for s in order if s in a.stages.split(",")]
    if not targets or (a.stages and len(targets) != len(a.stages.split(","))):
        sys.exit(f"chaos: --stages {a.stages}: the stages are {', '.join(order)}")
    timeline = reference(a.config, a.sets, ref_store, work / "reference.log")
    print(f"chaos: reference took {timeline['total']:.0f} s (start-up {timeline['startup']:.1f} s); windows "
          + ", ".join(f"{s} {w:.1f}" for s, w in timeline["windows"].items()), flush=True)

    kills = {s: 0 for s in order}
    kills["(finished)"] = 0
    resumes = finished_early = rounds = 0
    results = []
    while sum(kills.values()) < a.kills:
        rounds += 1
        store = str(work / f"round{rounds}")
        shutil.rmtree(store, ignore_errors=True)
        pipe = _pipeline(a.config, a.sets, store)
        log = work / f"round{rounds}.log"
        round_kills = {s: 0 for s in order}
        spent = {s: 0.0 for s in order}  # seconds this round's runs have spent in each stage so far
        while True:
            states = _states(pipe)
            todo = [s for s in targets if states[s] != "cached" and round_kills[s] < PER_STAGE]
            if not todo or sum(kills.values()) >= a.kills:
                break
            target = min(todo, key=lambda s: (kills[s], order.index(s)))
            if kills[target] > min(kills[s] for s in targets):
                break  # a stage behind it is cached in this round: a fresh round reaches it
            offset = log.stat().st_size if log.exists() else 0
            proc = _start(a.config, a.sets, store, log)
            code, deadline, delay, begun, flowing = None, None, 0.0, time.monotonic(), False
            entered: tuple[str, float] | None = None  # the stage this run is working on, and since when
            while True:  # kill inside the target stage, whatever this machine's speed today
                code = proc.poll()
                if code is not None:
                    break
                now = time.monotonic()
                if not flowing:  # the flow has begun: cached stages pass in a moment, then the work resumes
                    with log.open("rb") as f:
                        f.seek(offset)
                        flowing = b"Beginning flow run" in f.read()
                fps = pipe.fingerprints()
                current = next((s for s in order if pipe.store.state(s, fps[s]) != "cached"), None)
                working = flowing and current is not None and pipe.store.partial_dir(current, fps[current]).exists()
                if working and (entered is None or entered[0] != current):
                    if entered is not None:
                        spent[entered[0]] += now - entered[1]
                    entered = (current, now)
                if deadline is None and working and order.index(current) >= order.index(target):
                    left = max(timeline["windows"][current] - spent[current], 0.2 * timeline["windows"][current])
                    deadline = now + rng.uniform(0.0, left)
                if deadline is not None and now >= deadline:
                    delay = now - begun
                    break
                time.sleep(0.05)
            if code is not None:
                if code:  # a resumed run that cannot go on is what this bench looks for
                    tail = log.read_text(errors="replace")[-3000:]
                    sys.exit(f"chaos: round {rounds}: a run after {sum(kills.values())} kills failed (exit {code}):\n{tail}")
                finished_early += 1  # it ended before its kill: nothing to kill
                continue
            at = next((s for s in order if pipe.store.state(s, pipe.fingerprints()[s]) != "cached"), "(finished)")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if entered is not None:
                spent[entered[0]] += time.monotonic() - entered[1]
            kills[at] += 1
            if at in round_kills:
                round_kills[at] += 1
            resumes += 1
            print(f"kill {sum(kills.values())}/{a.kills}: round {rounds}, after {delay:.1f} s, in {at}", flush=True)
        # run to the end and compare this round's store with the reference
        proc = _start(a.config, a.sets, store, log)
        if proc.wait():
            sys.exit(f"chaos: the run after the last kill of round {rounds} failed (exit {proc.returncode}); see {log}")
        results.append(compare(a.config, a.sets, store, ref_store, a.weights_atol))

    print(f"\nchaos on {Path(a.config).name}: {sum(kills.values())} kills (SIGKILL to the process group) in {rounds} "
          f"round(s), {resumes} resumed runs, {finished_early} runs finished before their kill; seed {a.seed}")
    print("| stage | kills | data files | records | data mismatches | largest weight difference |")
    print("|---|---:|---:|---:|---:|---:|")
    mismatches = 0
    for s in order:
        rows = [r[s] for r in results]
        bad = [m for r in rows for m in r["data_mismatches"]] + ["fingerprint differs" for r in rows if not r["fingerprint_equal"]]
        mismatches += len(bad)
        diff = max((r["max_weight_diff"] for r in rows), default=0.0)
        print(f"| {s} | {kills[s]} | {sum(r['data_files'] for r in rows)} | {sum(r['records'] for r in rows)} | "
              f"{len(bad)} | {diff:.3g} |")
        for m in bad[:5]:
            print(f"    {s}: {m}")
    if kills["(finished)"]:
        print(f"| (every stage cached, the run ending) | {kills['(finished)']} | | | | |")
    weights = [s for s in order if any(r[s]["weight_mismatch"] for r in results)]
    print(f"data mismatches: {mismatches}; stages whose weights differ by more than {a.weights_atol}: {', '.join(weights) or 'none'}")
    if a.json:
        Path(a.json).write_text(json.dumps({"kills": kills, "rounds": rounds, "resumes": resumes,
                                            "finished_before_kill": finished_early, "results": results,
                                            "timeline": timeline}, indent=2))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
