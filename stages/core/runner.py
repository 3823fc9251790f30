"""Run one stage of a pipeline against the store: cache check, inputs, metrics, commit.

Used identically by the CLI (`polyalign stage`, without Prefect) and by the Prefect tasks in
`flows/`. Fan-out stages (per-language work) expose `units(cfg)`,
`run_unit(cfg, inputs, out, unit)` and `finish(cfg, inputs, out)`; the flow runs the units as
concurrent tasks, and `run_stage` runs them one after another.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import platform
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polyalign.stages.core.contract import Inputs, is_fan_out, run_module
from polyalign.stages.core.errors import MissingInputError, StorageFault, UserError
from polyalign.stages.core.loading import release_models
from polyalign.stages.core.pipeline import Pipeline
from polyalign.stages.core.model_specs import opted_in
from polyalign.stages.core.prepare import ensure_model
from polyalign.stages.core.store import Artifact, ArtifactWriter, atomic_write_json


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("polyalign")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def stage_inputs(pipeline: Pipeline, stage: str) -> Inputs:
    """The upstream artifacts of `stage` (each complete and valid) and model resolution."""
    node = pipeline.nodes[stage]
    fps = pipeline.fingerprints()
    artifacts: dict[str, Artifact] = {}
    for input_name, upstream in node.inputs.items():
        art = cached(pipeline, upstream)
        if art is None:
            state = pipeline.store.state(upstream, fps[upstream])
            raise MissingInputError(
                f"stage {stage!r} needs input {input_name!r} from stage {upstream!r}, which is "
                f"{state} in the store ({pipeline.store.location}); run `polyalign run "
                f"{pipeline.source} --until {upstream}` first"
            )
        artifacts[input_name] = art
    models = pipeline.header.models
    return Inputs(
        artifacts,
        model_path=lambda name: ensure_model(models[name], pipeline.models_root),
        model_dtype=lambda name: models[name].dtype,
        model_spec=lambda name: models[name],
    )


class PeakRSS:
    """Samples this process's resident memory in a thread; `.peak` in bytes, `.start` the
    resident memory when it began (what the process held before: models cached by earlier
    stages of the same process, say)."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRSS":
        import psutil

        proc = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                self._stop.wait(self.interval)

        self.peak = self.start = proc.memory_info().rss
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


def _prepare(pipeline: Pipeline, stage: str) -> tuple[Any, Inputs, ArtifactWriter]:
    node = pipeline.nodes[stage]
    inputs = stage_inputs(pipeline, stage)
    writer = pipeline.store.writer(stage, pipeline.fingerprints()[stage])
    writer.models = pipeline.model_identities(node)
    for field_path, model_name in node.config.model_refs().items():  # permissions beyond the defaults, in the card
        granted = opted_in(pipeline.header.models[model_name])
        if granted and field_path in writer.models:
            writer.models[field_path] += f" ({', '.join(granted)}: true)"
    return node, inputs, writer


def cached(pipeline: Pipeline, stage: str) -> Artifact | None:
    """The complete artifact of a stage, or None when there is none (one manifest read, no
    digests). A corrupt one raises CorruptArtifactError: it is never silently replaced."""
    fp = pipeline.fingerprints()[stage]
    if not pipeline.store.has_final(stage, fp):
        return None
    return pipeline.store.open(stage, fp, required=pipeline.nodes[stage].module.OUTPUTS)


def units(pipeline: Pipeline, stage: str) -> list[str] | None:
    """The fan-out units of a stage (e.g. languages), or None for a single-task stage."""
    node = pipeline.nodes[stage]
    return list(node.module.units(node.config)) if is_fan_out(node.module) else None


def _cuda_peak(writer: ArtifactWriter) -> None:
    try:
        import torch

        if torch.cuda.is_available():
            writer.metrics["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass


def injected_fault(name: str) -> None:
    """A test aid: POLYALIGN_INJECT_FAULT=NAME@MARKER makes the stage or unit NAME (`translate`,
    `translate/de`) fail once: while the MARKER file does not exist, it is created and the
    work raises. Unset, nothing happens."""
    spec = os.environ.get("POLYALIGN_INJECT_FAULT", "")
    if "@" not in spec:
        return
    target, marker = spec.split("@", 1)
    if target == name and not os.path.exists(marker):
        Path(marker).touch()
        raise RuntimeError(f"fault injected into {name} (POLYALIGN_INJECT_FAULT)")


# errors of the disk, not of polyalign: the stage stops with one line and keeps what it finished
_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EIO: "the disk reported an I/O error", errno.EROFS: "the file system is read-only",
                errno.EFBIG: "a file grew past the file system's limit"}
# libraries that write through C (torch.save, safetensors) report these as text, not as errno
_DISK_TEXTS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
               "Input/output error": errno.EIO, "Read-only file system": errno.EROFS}


def disk_fault(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, the file named) when `exc`, or an exception it was raised from, is a failed
    write of the disk; None for anything else."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, OSError) and current.errno in _DISK_ERRNOS:
            return current.errno, current.filename
        text = str(current)
        for needle, code in _DISK_TEXTS.items():
            if needle in text:
                return code, None
        current = current.__cause__ or current.__context__
        seen += 1
    return None


@contextlib.contextmanager
def storage_faults(pipeline: Pipeline, what: str) -> Iterator[None]:
    """Turn a failed write of the disk during `what` into a one-line StorageFault."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        fault = disk_fault(exc)
        if fault is None:
            raise
        code, filename = fault
        where = f" on {filename}" if filename else ""
        raise StorageFault(
            f"{what}: {_DISK_ERRNOS[code]} ({errno.errorcode[code]}){where}, store {pipeline.store.location}; "
            "what finished is kept: fix the disk and rerun to resume"
        ) from exc


def run_unit(pipeline: Pipeline, stage: str, unit: str) -> bool:
    """Run one fan-out unit of a stage into its partial folder (resumable, idempotent).

    Holds the unit's lock: a second run of the same config waits, then finds the unit done
    (or the stage committed) and returns False without touching it."""
    fp = pipeline.fingerprints()[stage]
    with pipeline.store.lock(stage, fp, unit):
        if pipeline.store.has_final(stage, fp) or pipeline.store.partial_dir(stage, fp).joinpath("_units", f"{unit}.json").is_file():
            return False
        with storage_faults(pipeline, f"stage {stage}[{unit}]"):
            _run_unit_locked(pipeline, stage, unit)
        return True


def _run_unit_locked(pipeline: Pipeline, stage: str, unit: str) -> None:
    injected_fault(f"{stage}/{unit}")
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
    return finish_or_reuse(pipeline, stage)[0]


def finish_or_reuse(pipeline: Pipeline, stage: str) -> tuple[Artifact, bool]:
    """As `finish`; also whether this call made the artifact (False: another process had
    committed it while this one waited for the lock, or a cut-off commit was completed)."""
    fp = pipeline.fingerprints()[stage]
    with pipeline.store.lock(stage, fp):
        hit = cached(pipeline, stage)
        if hit is not None:
            return hit, False
        if pipeline.store.promote_partial(stage, fp, pipeline.nodes[stage].module.OUTPUTS):
            return pipeline.store.open(stage, fp), True
        injected_fault(stage)
        with storage_faults(pipeline, f"stage {stage}"):
            return _finish_locked(pipeline, stage), True


ATTEMPTS = ".attempts.json"  # in the work folder: when each run of the finish step started (and ended)


def _earlier_attempts(writer: ArtifactWriter) -> list[dict[str, float]]:
    """Earlier runs of this finish step, each with its start and end (epoch seconds). A run
    that was killed has no end: it is taken as the last time it wrote into the work folder."""
    path = writer.dir / ATTEMPTS
    try:
        attempts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(attempts, list):
        return []
    for a in attempts:
        if a.get("end") is None:
            later = [p.stat().st_mtime for p in writer.dir.rglob("*") if p.is_file() and p.name != ATTEMPTS]
            a["end"] = max([a["start"], *(t for t in later if t >= a["start"])])
    return attempts


def _finish_locked(pipeline: Pipeline, stage: str) -> Artifact:
    node, inputs, writer = _prepare(pipeline, stage)
    earlier = _earlier_attempts(writer)
    atomic_write_json(writer.dir / ATTEMPTS, [*earlier, {"start": time.time(), "end": None}])
    start = time.perf_counter()
    with PeakRSS() as mem:
        run_module(node.module, node.config, inputs, writer, done=lambda unit: writer.exists(f"_units/{unit}.json"))
    wall = time.perf_counter() - start
    (writer.dir / ATTEMPTS).unlink(missing_ok=True)
    if earlier:  # a resumed stage: its wall time is that of every run of it, killed ones included
        writer.metrics["attempts"] = len(earlier) + 1
        writer.metrics["wall_seconds_last_attempt"] = round(wall, 3)
        wall += sum(max(0.0, a["end"] - a["start"]) for a in earlier)
    # units that ran as their own tasks (the flow) left their statistics in _units/
    unit_stats = [writer.read_json(f"_units/{u}.json", keys=("wall_seconds", "peak_rss_bytes")) for u in units(pipeline, stage) or [] if writer.exists(f"_units/{u}.json")]
    m = writer.metrics
    # wall time of the work: the finish step plus every unit (units may have run concurrently)
    m["wall_seconds"] = round(wall + sum(u.get("wall_seconds", 0) for u in unit_stats), 3)
    m["peak_rss_bytes"] = max([mem.peak] + [u.get("peak_rss_bytes", 0) for u in unit_stats])
    if not unit_stats:  # what the stage itself added to the process (fan-out stages: see their units)
        m["rss_start_bytes"] = mem.start
    m["tokens"] = int(m.get("tokens", 0))  # each stage counts its own, units included
    _cuda_peak(writer)
    if node.type in TRAINING:
        from polyalign.stages.core.efficiency import report

        m["efficiency"] = report(m, writer.dir / "model")
    if writer.card is not None:
        writer.write_text("README.md", writer.card)
    writer.write_json("metrics.json", m)
    manifest = {
        "stage": stage,
        "stage_type": node.type,
        "version": node.module.VERSION,
        "config": node.config.model_dump(mode="json"),
        "inputs": {k: pipeline.fingerprints()[v] for k, v in node.inputs.items()},
        "models": dict(writer.models),  # with the permissions an entry granted (see _prepare)
        "summary": writer.summary,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "polyalign_version": _version(),
        "host": platform.node(),
        "pid": os.getpid(),
    }
    art = writer.commit(manifest)
    release_models()  # the next stage loads what it needs; keep peak memory per stage
    return art


TRAINING = ("sft", "reward_model", "align")  # stage types that run under a multi-process launcher


def run_stage(pipeline: Pipeline, stage: str) -> tuple[Artifact, bool]:
    """Run a stage unless cached. Returns (artifact, was_cached).

    Under `accelerate launch` / `torchrun` (see core.distributed) every process trains and
    only the main one writes and commits; the others wait for its artifact."""
    from polyalign.stages.core import distributed

    hit = cached(pipeline, stage)
    if hit is not None:
        return hit, True
    if distributed.world_size() > 1:
        node = pipeline.nodes[stage]
        if node.type not in TRAINING:
            from polyalign.stages.core.errors import UserError

            raise UserError(
                f"stage {stage!r} ({node.type}) runs in one process; "
                f"only {', '.join(TRAINING)} run under accelerate launch / torchrun"
            )
        if not distributed.is_main():
            return _follow(pipeline, stage), False
    art = finish(pipeline, stage)
    distributed.barrier()  # the followers open the artifact once it is committed
    return art, False


def _follow(pipeline: Pipeline, stage: str) -> Artifact:
    """A non-main process: train with the others, write nothing, open the main's artifact."""
    from polyalign.stages.core import distributed

    node = pipeline.nodes[stage]
    inputs = stage_inputs(pipeline, stage)
    writer = distributed.FollowerWriter(pipeline.store, stage, pipeline.fingerprints()[stage])
    run_module(node.module, node.config, inputs, writer)
    distributed.barrier()
    art = cached(pipeline, stage)
    if art is None:
        raise RuntimeError(f"stage {stage!r}: the main process did not commit its artifact")
    return art


def store_path(pipeline: Pipeline, stage: str) -> Path:
    return pipeline.store.final_dir(stage, pipeline.fingerprints()[stage])
