"""Time `polyalign run CONFIG` cold (empty store) and again (every stage cached).

Baseline: the cold run of the same config in the same invocation. Prints both wall times and
the ratio; the walking-skeleton target is a cached rerun of configs/tiny.yaml in at most 15 s.

    .venv/bin/python bench/cached_rerun.py [configs/tiny.yaml]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_run(config: str, store: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "polyalign", "run", config, "--store", store],
        cwd=ROOT, capture_output=True, text=True,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"polyalign run failed:\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "configs/tiny.yaml"
    with tempfile.TemporaryDirectory() as store:
        cold = timed_run(config, store)
        warm = timed_run(config, store)
    print(f"config: {config}")
    print(f"baseline (cold run, empty store): {cold:7.1f} s")
    print(f"cached rerun (every stage Cached): {warm:7.1f} s")
    print(f"ratio cached / cold: {warm / cold:.3f}   target: cached rerun <= 15 s -> {'met' if warm <= 15 else 'NOT met'}")


if __name__ == "__main__":
    main()
