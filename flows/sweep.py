"""A sweep as one Prefect flow: the pipeline once per variant, then one report.

Variants run one after another through the pipeline flow's own body (`run_pipeline`), so
every stage is a task of this flow run (with `until`, that stage and the stages it takes
inputs from, not every stage before it in the pipeline); a stage whose fingerprint a variant shares with an
earlier one (everything upstream of the swept field) is a store hit and shows as Cached. A
variant that fails is recorded in the table and the sweep goes on. The report task measures
each variant's inference speed and publishes the table (markdown, JSON, plot on disk, and a
Prefect table artifact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from polyalign.flows.pipeline import RUNNER, USER_ERROR, _artifact_key, run_pipeline
from polyalign.stages.core.errors import UserError
from polyalign.stages.core.loading import release_models
from polyalign.stages.core.pipeline import load_pipeline


@task(cache_policy=NO_CACHE, task_run_name="sweep-report")
def report_task(config: str, runs: list[dict[str, Any]], store: str | None, out: str, train_stage: str,
                new_tokens: int) -> dict[str, str]:
    from polyalign.stages.core import sweep
    from polyalign.stages.core.loading import release_models
    from polyalign.stages.core.runner import stage_inputs

    base_speed: dict[tuple[str, str], float | None] = {}
    for r in runs:
        pipe = r["pipeline"] = load_pipeline(config, r["overrides"], store)
        if train_stage not in pipe.nodes:
            continue
        fp = pipe.fingerprints()[train_stage]
        if pipe.store.state(train_stage, fp) != "cached":
            continue
        node = pipe.nodes[train_stage]
        inputs = stage_inputs(pipe, train_stage)
        model_name = getattr(node.config, "model", None)
        if model_name is None:  # a training stage always names the model it trains
            continue
        base, dtype = inputs.model(model_name), inputs.model_dtype(model_name)
        art = pipe.store.open(train_stage, fp)
        plugins = list(art.metrics.get("plugins") or [])
        # per-language plugins: one of them is timed (they have the same shape)
        folder = str(art.file(f"model/{plugins[0]}" if plugins else "model"))
        print(f"[sweep] inference speed of {r['label']}", flush=True)
        speeds = sweep.inference_speed(base, folder, dtype, new_tokens)
        # the base model alone is the same for every variant on one base: measured once
        speeds["base"] = base_speed.setdefault((base, dtype), speeds["base"])
        r["inference"] = speeds
        release_models()
    rows = sweep.sweep_rows(runs, train_stage)
    title = f"polyalign sweep of {Path(config).name}"
    paths = sweep.write_report(rows, Path(out), title)
    first = runs[0]["pipeline"]
    create_table_artifact(key=_artifact_key(first, "sweep-table"),
                          table=[{k: v for k, v in row.items() if k not in ("overrides", "scores")} | (row.get("scores") or {})
                                 for row in rows],
                          description=f"{title}: scores per language, training cost, inference cost per variant")
    create_markdown_artifact(key=_artifact_key(first, "sweep"), markdown=paths["markdown"].read_text(),
                             description=title)
    return {k: str(v) for k, v in paths.items()}


@flow(name="polyalign-sweep", log_prints=False, task_runner=RUNNER)
def sweep_flow(config: str, variants: list[list[str]], labels: list[str], until: str | None = None,
               store: str | None = None, concurrency: int = 2, out: str = "sweep", train_stage: str = "sft",
               new_tokens: int = 32) -> Any:
    """Run `config` once per override list in `variants`, then write the comparison table."""
    # the libraries a training stage imports, imported before the first variant: its wall time
    # would otherwise include them and the others' not
    import peft  # noqa: F401
    import trl  # noqa: F401

    runs: list[dict[str, Any]] = []
    for overrides, name in zip(variants, labels):
        print(f"[sweep] variant {name}", flush=True)
        error = None
        try:
            states = run_pipeline(config, overrides, until, store, concurrency, only_upstream=True)
            if not isinstance(states, dict):  # a Failed state: a user error of this variant
                error = (states.message or "failed").removeprefix(USER_ERROR)
        except Exception as exc:  # noqa: BLE001 - one variant's failure is a row of the table
            import traceback

            traceback.print_exc()  # a crash, not a user error: its traceback stays in the run's log
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        runs.append({"label": name, "overrides": overrides, "error": error})
        release_models()  # the next variant starts without this one's cached models
    try:
        return report_task(config, runs, store, out, train_stage, new_tokens)
    except UserError as exc:
        return Failed(message=USER_ERROR + str(exc))
