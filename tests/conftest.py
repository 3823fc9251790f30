"""Shared fixtures: an isolated models folder (tiny models are built once per session) and,
for flow tests, one session-scoped Prefect test harness."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    os.environ["POLYALIGN_MODELS"] = str(path)
    os.environ.pop("POLYALIGN_STORE", None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def cli(*args: str, check: bool = False, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m polyalign ARGS` and capture its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "polyalign", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"polyalign {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_translated(tmp_path_factory, models_dir) -> Path:
    """A store with the tiny config's self_instruct and translate done, built once per session.
    Read-only: a test copies it (`copy_store`) before running anything into it."""
    from polyalign.stages.core.pipeline import load_pipeline
    from polyalign.stages.core.runner import run_stage

    store = tmp_path_factory.mktemp("tiny-translated")
    pipe = load_pipeline(TINY, store=str(store))
    from polyalign.stages.core.loading import release_models

    for stage in ("self_instruct", "translate"):
        run_stage(pipe, stage)
    release_models()
    return store


def copy_store(src: Path, dst: Path, stages: tuple[str, ...] = ("self_instruct", "translate")) -> str:
    """A writable copy of the given stages' folders of store `src` at `dst`."""
    import shutil

    for stage in stages:
        shutil.copytree(src / stage, dst / stage)
    return str(dst)
