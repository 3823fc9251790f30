"""The polyalign DAG as one Prefect flow.

Each stage is a task that waits on the tasks of its upstream stages, so the run graph draws
the DAG and independent stages run side by side (training stages one at a time in a process:
they share its devices). A stage whose artifact is already in the store returns a `Cached`
state (the store, not Prefect's task cache, is the source of truth) and still publishes its
markdown artifact, so the UI shows what was reused and retrying a failed flow run resumes it.
Fan-out stages (translation and evaluation, one unit per language) run their units as
concurrent tasks named by language; a failing language does not stop the others from
finishing and saving their shards. A stage or unit that runs publishes a progress artifact
(`<pipeline>-<stage>[-<unit>]-progress`) updated from its bar or training step. With
`task_runner: dask` or `ray` in the config the tasks run on that engine's workers instead of
the flow's threads.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from polyalign.stages.core import progress, runner
from polyalign.stages.core.errors import UserError, redact
from polyalign.stages.core.pipeline import Pipeline, load_pipeline


def _artifact_key(pipeline: Pipeline, stage: str) -> str:
    raw = f"polyalign-{pipeline.name}-{stage}".lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in raw)


def _stage_markdown(stage: str, art: Any, was_cached: bool) -> str:
    m = art.metrics
    card = art.path / "README.md"
    lines = [
        f"### {stage} ({'cached' if was_cached else 'ran'})",
        "",
        art.manifest.get("summary", ""),
        "",
        f"- fingerprint: `{art.fingerprint[:16]}`",
        f"- artifact: `{art.path}`",
        f"- wall: {m.get('wall_seconds', 'n/a')} s, tokens: {m.get('tokens', 'n/a')}, "
        f"peak RSS: {round(m.get('peak_rss_bytes', 0) / 2**20)} MiB",
    ]
    if "trainable_params" in m:
        lines.append(f"- trainable parameters: {m['trainable_params']:,}")
    if "efficiency" in m:
        from polyalign.stages.core.efficiency import table

        lines += ["", table({stage: m["efficiency"]})]
    if card.exists():
        lines.append(f"- data card: `{card}`")
    return "\n".join(lines)


# A Failed state whose message starts with this is a user error (a bad config or file, a
# corrupt artifact): one line for the CLI and the UI, and no traceback in the logs.
USER_ERROR = "polyalign: "


_TRAINING = threading.Lock()  # one training stage at a time per process: they share its devices
# per flow run: at most `concurrency` stage or unit tasks work at once (tasks waiting on their
# upstream hold no slot); the key travels to the tasks as a plain string
_SLOTS: dict[str, threading.BoundedSemaphore] = {}


def _slot(key: str) -> Any:
    return _SLOTS.get(key) or contextlib.nullcontext()


def _publish(pipeline: Pipeline, stage: str, art: Any, was_cached: bool) -> None:
    create_markdown_artifact(key=_artifact_key(pipeline, stage), markdown=_stage_markdown(stage, art, was_cached),
                             description=f"polyalign stage {stage}")


def _progress_sink(key: str, description: str) -> Any:
    """A progress artifact of this task, created at its first report and updated after."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    made: list[Any] = []
    broken: list[str] = []

    def sink(percent: float) -> None:
        if broken:
            return
        try:
            if made:
                update_progress_artifact(made[0], percent)
            else:
                made.append(create_progress_artifact(percent, key=key, description=description))
        # best effort, whatever the API client raises (HTTP, connection, no run context):
        # a progress bar never stops the work; said once, then no more tries for this task
        except Exception as exc:  # noqa: BLE001
            broken.append(type(exc).__name__)
            print(f"[progress] {key}: not published ({type(exc).__name__}); the task goes on without it")

    return progress.reporting_to(sink)


@task(cache_policy=NO_CACHE, task_run_name="{stage}")
def stage_task(config: str, overrides: list[str], store: str | None, stage: str, slots: str = "") -> Any:
    with _slot(slots):
        return _stage(config, overrides, store, stage)


def _stage(config: str, overrides: list[str], store: str | None, stage: str) -> Any:
    try:
        pipeline = load_pipeline(config, overrides, store)
        hit = art = runner.cached(pipeline, stage)
        if hit is None:
            training = _TRAINING if pipeline.nodes[stage].type in runner.TRAINING else contextlib.nullcontext()
            with training, _progress_sink(_artifact_key(pipeline, f"{stage}-progress"), f"polyalign stage {stage}: progress"):
                art, built = runner.finish_or_reuse(pipeline, stage)  # another run may have made it meanwhile
                hit = None if built else art
        assert art is not None
        if hit is not None:
            _publish(pipeline, stage, hit, True)
            return Completed(name="Cached", message=f"{stage}: reused artifact {hit.fingerprint[:12]}", data=hit.manifest.get("summary", ""))
    except UserError as exc:
        return Failed(message=USER_ERROR + redact(str(exc)))
    _publish(pipeline, stage, art, False)
    return art.manifest.get("summary", "")


@task(cache_policy=NO_CACHE, task_run_name="{stage}[{unit}]")
def unit_task(config: str, overrides: list[str], store: str | None, stage: str, unit: str, slots: str = "") -> Any:
    with _slot(slots):
        try:
            pipeline = load_pipeline(config, overrides, store)
            with _progress_sink(_artifact_key(pipeline, f"{stage}-{unit}-progress"), f"polyalign {stage}[{unit}]: progress"):
                runner.run_unit(pipeline, stage, unit)
        except UserError as exc:
            return Failed(message=USER_ERROR + redact(str(exc)))
        return unit


class UnitsFailed(RuntimeError):
    """Some fan-out units of a stage failed; the finished ones are kept in the partial folder."""


# threads that mostly wait on upstream tasks; how many work at once is `concurrency`
RUNNER = ThreadPoolTaskRunner(max_workers=64)


def _engine_runner(pipeline: Pipeline) -> Any:
    """The task runner of the config's `task_runner` (dask or ray), not yet started; None for
    thread, whose tasks go to the flow's own thread pool."""
    spec = pipeline.header.task_runner
    if spec.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise UserError("task_runner: dask needs prefect-dask: pip install 'polyalign[dask]'") from None
        if spec.address:
            return DaskTaskRunner(address=spec.address)
        # one task per worker process at a time: a unit loads a model, two in one process would share its memory
        return DaskTaskRunner(cluster_kwargs={"n_workers": spec.workers or 2, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    if spec.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise UserError("task_runner: ray needs prefect-ray: pip install 'polyalign[ray]'") from None
        return RayTaskRunner(address=spec.address, init_kwargs={"num_cpus": spec.workers} if spec.workers and not spec.address else None)
    return None


@flow(name="polyalign", log_prints=False, task_runner=RUNNER)
def polyalign_flow(
    config: str,
    overrides: list[str] | None = None,
    until: str | None = None,
    store: str | None = None,
    concurrency: int = 2,
) -> Any:
    """Run the pipeline in `config` (up to `until`), resuming from whatever the store holds.

    Returns {stage: state name}; a user error (bad config or file, corrupt artifact) ends the
    run as a Failed state whose message is that one line.
    """
    return run_pipeline(config, list(overrides or []), until, store, concurrency)


def run_pipeline(config: str, overrides: list[str], until: str | None, store: str | None, concurrency: int,
                 only_upstream: bool = False) -> Any:
    """The body of every polyalign flow (the generic one and each served deployment's): the
    stages up to `until` in pipeline order, or with `only_upstream` just `until` and the
    stages it takes inputs from (a sweep's target)."""
    import uuid

    states: dict[str, str] = {}
    slots = uuid.uuid4().hex
    _SLOTS[slots] = threading.BoundedSemaphore(max(1, concurrency))
    try:
        pipeline = load_pipeline(config, overrides, store)
        pipeline.store.check_root(writable=True)
        stages = pipeline.until(until)
        if only_upstream and until is not None:
            stages = [*pipeline.upstream(until), until]
        pipeline.check_servers([p.name for p in pipeline.plan(stages) if p.state != "cached"])
        # every task is submitted now, in topological order, waiting on its upstream stages'
        # tasks: a worker thread only ever waits on tasks submitted before its own, so the
        # oldest unfinished task can always run and any pool size makes progress
        futures: dict[str, Any] = {}
        unit_futures: dict[str, list[tuple[str, Any]]] = {}
        with contextlib.ExitStack() as engine:
            tasks = _engine_runner(pipeline)
            if tasks is not None:
                engine.enter_context(tasks)  # started here, shut down once every task has ended
            else:
                from prefect.context import FlowRunContext

                context = FlowRunContext.get()
                assert context is not None, "run_pipeline runs inside a flow"
                tasks = context.task_runner
            for stage in stages:
                upstream = [futures[s] for s in dict.fromkeys(pipeline.nodes[stage].inputs.values()) if s in futures]
                fan = runner.units(pipeline, stage) if runner.cached(pipeline, stage) is None else None
                r = pipeline.header.retries
                units = unit_task.with_options(retries=r.units, retry_delay_seconds=r.delay_seconds)
                finish = stage_task.with_options(
                    retries=r.training if pipeline.nodes[stage].type in runner.TRAINING else r.stages, retry_delay_seconds=r.delay_seconds)
                common = {"config": config, "overrides": overrides, "store": store, "stage": stage, "slots": slots}
                unit_futures[stage] = [(u, tasks.submit(units, {**common, "unit": u}, upstream)) for u in fan or []]
                futures[stage] = tasks.submit(finish, common, upstream + [f for _, f in unit_futures[stage]])
            wait([f for fs in unit_futures.values() for _, f in fs] + list(futures.values()))
            ended = {stage: (futures[stage].state, [(u, f.state) for u, f in unit_futures[stage]]) for stage in stages}
        for stage in stages:  # the first stage that failed, upstream first, decides the run's end
            state, fan_states = ended[stage]
            failed = {u: st for u, st in fan_states if st.is_failed() or st.is_crashed()}
            if failed:
                done = [u for u, _ in fan_states if u not in failed]
                reasons = "; ".join(f"{u}: {(st.message or st.name).removeprefix(USER_ERROR)}" for u, st in failed.items())
                message = f"stage {stage}: units {list(failed)} failed ({reasons}); {done} finished and are kept"
                if all((st.message or "").startswith(USER_ERROR) for st in failed.values()):
                    return Failed(message=USER_ERROR + redact(message))
                raise UnitsFailed(redact(message))
            if not state.is_completed():
                if (state.message or "").startswith(USER_ERROR):
                    return Failed(message=state.message)
                if not state.is_final():
                    raise RuntimeError(f"stage {stage}: {state.name} ({state.message})")
                state.result()  # re-raises the stage's exception and fails the flow
            states[stage] = state.name
        _summary_artifact(pipeline, list(states), states)
    except UserError as exc:
        return Failed(message=USER_ERROR + redact(str(exc)))
    finally:
        _SLOTS.pop(slots, None)
    return states


def _summary_artifact(pipeline: Pipeline, stages: list[str], states: dict[str, str]) -> None:
    lines = [f"# polyalign pipeline `{pipeline.name}`", "", "| stage | state | summary |", "|---|---|---|"]
    evaluation = None
    for plan in pipeline.plan(stages):
        art = pipeline.store.open(plan.name, plan.fingerprint)
        summary = art.manifest.get("summary", "").replace("\n", " ")
        if plan.type == "evaluate":
            evaluation = art
            summary = "see table below"
        lines.append(f"| {plan.name} | {states[plan.name]} | {summary} |")
    if evaluation is not None:
        lines += ["", "## Evaluation", "", evaluation.manifest.get("summary", "")]
        from polyalign.stages.core.report import leaderboard_rows

        rows = leaderboard_rows(evaluation.read_json("results.json"))
        create_table_artifact(
            key=_artifact_key(pipeline, "evaluation-table"),
            table=rows,
            description="Evaluation per benchmark, language and stage (acc / acc_norm with standard errors; BLEU, chrF++, reward, win rate)",
        )
    create_markdown_artifact(key=_artifact_key(pipeline, "summary"), markdown="\n".join(lines), description="polyalign run summary")
