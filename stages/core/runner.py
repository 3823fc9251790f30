"""Run one stage of a pipeline against the store: cache check, inputs, metrics, commit.

Used identically by the CLI (`polyalign stage`, without Prefect) and by the Prefect tasks in
`flows/`. Fan-out stages (per-language work) expose `units(cfg)`,
`run_unit(cfg, inputs, out, unit)` and `finish(cfg, inputs, out)`; the flow runs the units as
concurrent tasks, and `run_stage` runs them one after another.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

from polyalign import __version__
from polyalign.stages.core.errors import MissingInputError
from polyalign.stages.core.models import ensure_model, release_models
from polyalign.stages.core.pipeline import Pipeline
from polyalign.stages.core.store import Artifact, ArtifactWriter, CorruptArtifactError


class Inputs:
    """What a stage receives: upstream artifacts by input name, and model resolution."""

    def __init__(self, pipeline: Pipeline, stage: str):
        self.pipeline = pipeline
        self.stage = stage
        node = pipeline.nodes[stage]
        fps = pipeline.fingerprints()
        self.artifacts: dict[str, Artifact] = {}
        for input_name, upstream in node.inputs.items():
            art = cached(pipeline, upstream)
            if art is None:
                state = pipeline.store.state(upstream, fps[upstream])
                raise MissingInputError(
                    f"stage {stage!r} needs input {input_name!r} from stage {upstream!r}, which is "
                    f"{state} in the store ({pipeline.store.root}); run `polyalign run "
                    f"{pipeline.source} --until {upstream}` first"
                )
            self.artifacts[input_name] = art

    def __getitem__(self, name: str) -> Artifact:
        return self.artifacts[name]

    def get(self, name: str) -> Artifact | None:
        return self.artifacts.get(name)

    def model(self, name: str) -> str:
        """A loadable path (or hub id) for a model of the pipeline's `models:` table."""
        return ensure_model(self.pipeline.header.models[name], self.pipeline.models_root)

    def model_dtype(self, name: str) -> str:
        return self.pipeline.header.models[name].dtype


class PeakRSS:
    """Samples this process's resident memory in a thread; `.peak` in bytes."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRSS":
        import psutil

        proc = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                self._stop.wait(self.interval)

        self.peak = proc.memory_info().rss
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


def _prepare(pipeline: Pipeline, stage: str) -> tuple[Any, Inputs, ArtifactWriter]:
    node = pipeline.nodes[stage]
    inputs = Inputs(pipeline, stage)
    writer = pipeline.store.writer(stage, pipeline.fingerprints()[stage])
    writer.models = pipeline.model_identities(node)
    return node, inputs, writer


def cached(pipeline: Pipeline, stage: str) -> Artifact | None:
    """The complete, verified artifact of a stage, or None (one manifest read, no digests)."""
    fp = pipeline.fingerprints()[stage]
    if not pipeline.store.final_dir(stage, fp).exists():
        return None
    try:
        return pipeline.store.open(stage, fp)
    except CorruptArtifactError:
        return None


def units(pipeline: Pipeline, stage: str) -> list[str] | None:
    """The fan-out units of a stage (e.g. languages), or None for a single-task stage."""
    node = pipeline.nodes[stage]
    fn = getattr(node.module, "units", None)
    return list(fn(node.config)) if fn else None


def _cuda_peak(writer: ArtifactWriter) -> None:
    try:
        import torch

        if torch.cuda.is_available():
            writer.metrics["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass


def run_unit(pipeline: Pipeline, stage: str, unit: str) -> None:
    """Run one fan-out unit of a stage into its partial folder (resumable, idempotent)."""
    node, inputs, writer = _prepare(pipeline, stage)
    start = time.perf_counter()
    with PeakRSS() as mem:
        node.module.run_unit(node.config, inputs, writer, unit)
    writer.write_json(
        f"_units/{unit}.json",
        {**writer.metrics, "wall_seconds": round(time.perf_counter() - start, 3), "peak_rss_bytes": mem.peak},
    )


def finish(pipeline: Pipeline, stage: str) -> Artifact:
    """Complete a stage whose units are done (or run a single-task stage) and commit it.

    Holds the artifact's lock, so two processes (a CLI run and a retry from the UI, say)
    never commit the same artifact twice.
    """
    fp = pipeline.fingerprints()[stage]
    with pipeline.store.lock(stage, fp):
        hit = cached(pipeline, stage)
        if hit is not None:
            return hit
        if pipeline.store.promote_partial(stage, fp):
            return pipeline.store.open(stage, fp)
        return _finish_locked(pipeline, stage)


def _finish_locked(pipeline: Pipeline, stage: str) -> Artifact:
    node, inputs, writer = _prepare(pipeline, stage)
    start = time.perf_counter()
    unit_dir = writer.dir / "_units"
    with PeakRSS() as mem:
        if units(pipeline, stage) is not None:
            for unit in units(pipeline, stage):
                if not (unit_dir / f"{unit}.json").exists():
                    node.module.run_unit(node.config, inputs, writer, unit)
            node.module.finish(node.config, inputs, writer)
        else:
            node.module.run(node.config, inputs, writer)
    wall = time.perf_counter() - start
    unit_stats = []
    if unit_dir.exists():
        unit_stats = [json.loads(p.read_text()) for p in sorted(unit_dir.glob("*.json"))]
    m = writer.metrics
    # wall time of the work: the finish step plus every unit (units may have run concurrently)
    m["wall_seconds"] = round(wall + sum(u.get("wall_seconds", 0) for u in unit_stats), 3)
    m["peak_rss_bytes"] = max([mem.peak] + [u.get("peak_rss_bytes", 0) for u in unit_stats])
    m["tokens"] = int(m.get("tokens", 0))  # each stage counts its own, units included
    _cuda_peak(writer)
    if writer.card is not None:
        writer.write_text("README.md", writer.card)
    writer.write_json("metrics.json", m)
    manifest = {
        "stage": stage,
        "stage_type": node.type,
        "version": node.module.VERSION,
        "config": node.config.model_dump(mode="json"),
        "inputs": {k: pipeline.fingerprints()[v] for k, v in node.inputs.items()},
        "models": pipeline.model_identities(node),
        "summary": writer.summary,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "polyalign_version": __version__,
        "host": platform.node(),
        "pid": os.getpid(),
    }
    art = writer.commit(manifest)
    release_models()  # the next stage loads what it needs; keep peak memory per stage
    return art


def run_stage(pipeline: Pipeline, stage: str) -> tuple[Artifact, bool]:
    """Run a stage unless cached. Returns (artifact, was_cached)."""
    hit = cached(pipeline, stage)
    if hit is not None:
        return hit, True
    return finish(pipeline, stage), False


def store_path(pipeline: Pipeline, stage: str) -> Path:
    return pipeline.store.final_dir(stage, pipeline.fingerprints()[stage])
