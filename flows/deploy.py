"""Deployments: one per pipeline config, served from this process (`polyalign serve`).

Every deployment runs the module-level flow `polyalign-pipeline` (Prefect's runner imports it
in a fresh process for each run), with the config's absolute path as a read-only parameter, so
a run started from the UI finds the config whatever the serving process's working directory.
The run form is typed for the pipeline: `until` is a choice among its stages, `overrides` a
list of {key, value} entries (each one the CLI's `--set KEY.PATH=VALUE`; Prefect's UI draws
one Key and one Value box per entry, with Add item), `concurrency` and `store` as in
`polyalign run`. A bad override entered in the form fails the run with the one-line message
the CLI would print.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

from prefect import flow
from pydantic import BaseModel, BeforeValidator, Field

from polyalign.flows.pipeline import RUNNER, run_pipeline
from polyalign.stages.core.pipeline import Pipeline


class Override(BaseModel):
    """One config value to change for this run: --set KEY.PATH=VALUE."""

    key: str = Field(description="KEY.PATH, e.g. sft.train.max_steps (a stage's name stands for stages.<name>)")
    value: str = Field(description="Read as YAML, e.g. 20 or [fr, de]")


def _entries(value: Any) -> Any:
    """Also take, from Python or an API call without the deployment's schema, overrides as
    {KEY.PATH: VALUE} or as "KEY.PATH=VALUE" strings (the CLI's --set)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [{"key": k, "value": v} for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [dict(zip(("key", "value"), v.split("=", 1))) if isinstance(v, str) and "=" in v else v for v in value]
    return value


# an array of {key, value} objects: the form Prefect's UIs (V2 and V1) can edit, an entry at a time
Overrides = Annotated[Sequence[Override], BeforeValidator(_entries)]


def set_items(overrides: Sequence[Override]) -> list[str]:
    """The overrides as the CLI's --set items, KEY.PATH=VALUE."""
    return [f"{o.key}={o.value}" for o in overrides]


@flow(name="polyalign-pipeline", log_prints=False, task_runner=RUNNER)
def polyalign_pipeline(
    config: str,
    until: Optional[str] = None,
    overrides: Overrides = (),
    concurrency: int = 2,
    store: Optional[str] = None,
) -> Any:
    """Run the pipeline, resuming from the artifacts already in the store.

    Args:
        config: The pipeline YAML (fixed by the deployment).
        until: Stop after this stage (empty: run every stage).
        overrides: Config values to change for this run, each as --set KEY.PATH=VALUE on
            the command line: Add item, then its Key and its Value (read as YAML), e.g.
            key sft.train.max_steps, value 20; or key languages, value [fr, de].
        concurrency: Stage or language tasks run at once.
        store: Artifact store root (empty: the config's, or $POLYALIGN_STORE).
    """
    return run_pipeline(config, set_items(overrides), until, store, max(1, int(concurrency)))


def runner_environment(environ: dict[str, str]) -> dict[str, str]:
    """The settings `polyalign serve` adds to the environment before Prefect's runner starts:
    the runner's own web server (health checks, when PREFECT_RUNNER_SERVER_ENABLE is set)
    listens on 127.0.0.1 unless the user chose a host."""
    return {"PREFECT_RUNNER_SERVER_HOST": environ.get("PREFECT_RUNNER_SERVER_HOST") or "127.0.0.1"}


def deployment(config_path: str, pipeline: Pipeline, name: str, plan: list[Any]) -> Any:
    """The runner deployment of one config: its path frozen, `until` offered as a choice of
    the pipeline's stages."""
    from prefect.utilities.annotations import freeze

    path = str(Path(config_path).resolve())
    dep = polyalign_pipeline.to_deployment(
        name=name, schedules=plan, parameters={"config": freeze(path)}, tags=["polyalign"],
        description=pipeline.header.description or f"polyalign pipeline {pipeline.name} ({path})",
    )
    until = dep._parameter_openapi_schema.properties["until"]
    for option in until.get("anyOf", [until]):
        if option.get("type") == "string":
            option["enum"] = list(pipeline.order)
    return dep


def until_choices(deployment_id: Any, pipeline: Pipeline) -> None:
    """Offer `until` as a choice of the pipeline's stages on a deployment already registered."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    async def update() -> None:
        async with get_client() as client:
            dep = await client.read_deployment(deployment_id)
            schema = dict(dep.parameter_openapi_schema or {})
            until = schema.get("properties", {}).get("until", {})
            for option in until.get("anyOf", [until]):
                if option.get("type") == "string":
                    option["enum"] = list(pipeline.order)
            await client.update_deployment(deployment_id, DeploymentUpdate(parameter_openapi_schema=schema))

    asyncio.run(update())


def schedules(pipeline: Pipeline, cron: str | None, interval: float | None) -> list[Any]:
    """The deployment's schedules: --cron or --interval when given, else the config's
    `schedule:` block, else none (runs start from the UI or the API only)."""
    from prefect.schedules import Cron, Interval, RRule

    if cron is not None:
        return [Cron(cron)]
    if interval is not None:
        return [Interval(datetime.timedelta(seconds=interval))]
    s = pipeline.header.schedule
    if s is None:
        return []
    if s.cron is not None:
        return [Cron(s.cron, timezone=s.timezone, active=s.active)]
    if s.interval is not None:
        return [Interval(datetime.timedelta(seconds=s.interval), timezone=s.timezone, active=s.active)]
    return [RRule(str(s.rrule), timezone=s.timezone, active=s.active)]


def describe(schedule: Any) -> str:
    if schedule.cron:
        text = f"cron {schedule.cron!r}"
    elif schedule.interval:
        text = f"every {schedule.interval.total_seconds():g} s"
    else:
        text = f"rrule {schedule.rrule!r}"
    if schedule.timezone:
        text += f" ({schedule.timezone})"
    return text + ("" if schedule.active else ", paused")
