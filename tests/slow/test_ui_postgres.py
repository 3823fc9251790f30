"""The topology of docker/compose.yaml, started natively, driven through the Prefect UI in a
headless Chromium (Playwright):

- PostgreSQL from the system's packages (a throwaway cluster, password auth over TCP);
- `prefect server start` on that database (the UI and the API);
- `polyalign serve configs/tiny.yaml --cron "0 3 * * *"`, its store in a temporary folder
  (POLYALIGN_STORE, as the worker's /store volume).

In the UI (the default one, V2): the deployment's page shows its name, its schedule and its
parameters; Run -> Custom run opens the typed form, where `until` is a choice of the
pipeline's stages and `overrides` a list of Key/Value entries (Add item) with an example;
the run it starts completes; its page shows the run graph, the stage task runs and the
artifacts, the evaluation table among them. A second custom run gets an override entered in
the form (Add item, Key, Value): only the stage it changes runs again, the others are Cached.
A third run, with another override and a fault injected once into `evaluate`
(POLYALIGN_INJECT_FAULT, armed by removing its marker file), fails; the Retry of its page's
menu resumes it: the stages before `evaluate` Cached. Through the API: the task states and
artifacts of the runs; in PostgreSQL: the deployment's row.

Screenshots go to $POLYALIGN_SCREENSHOTS (default: the test's temporary folder).
Needs: PostgreSQL server binaries, Chromium (/usr/bin/chromium), the `playwright` package
(`make ui-test-deps`); the test skips with one line when one is missing."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.slow import topology
from tests.slow.topology import wait_for

pytestmark = pytest.mark.slow

DEPLOYMENT = "ui-test"
CRON = "0 3 * * *"
STAGES = ["self_instruct", "translate", "sft", "preferences", "reward_model", "align", "evaluate"]
TABLE_KEY = "polyalign-tiny-evaluation-table"
OVERRIDE = {"key": "evaluate.translation.limit", "value": "2"}  # changes the evaluate stage only
RUN_TIMEOUT = 900  # seconds: the whole tiny DAG on a shared 2-core machine takes 2 to 5 minutes
UI_TIMEOUT_MS = 60_000


def _chromium() -> str:
    for candidate in (os.environ.get("POLYALIGN_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.skip("Chromium not found (/usr/bin/chromium); `make ui-test-deps` installs it")


def _requirements() -> str:
    """The Chromium executable; skips (one line) when the topology cannot start here."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright package is not installed; `make ui-test-deps` installs it")
    try:
        topology.postgres_bin()
    except topology.Unavailable as exc:
        pytest.skip(str(exc))
    return _chromium()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    path = Path(os.environ.get("POLYALIGN_SCREENSHOTS") or tmp_path / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def stack(tmp_path):
    """PostgreSQL, a Prefect server on it, and `polyalign serve` of the tiny config; all of
    them stopped at the end, whatever happened."""
    chromium = _requirements()
    logs = tmp_path / "logs"
    logs.mkdir()
    with contextlib.ExitStack() as services:  # closed in reverse: serve, the server, PostgreSQL
        try:
            db = services.enter_context(topology.postgres(logs))
        except topology.Unavailable as exc:
            pytest.skip(str(exc))
        env = services.enter_context(topology.prefect_server(tmp_path / "prefect", logs, db.url))
        worker_env = {k: v for k, v in env.items() if k != "PREFECT_API_DATABASE_CONNECTION_URL"}
        worker_env["POLYALIGN_STORE"] = str(tmp_path / "store")
        fault = tmp_path / "fault-fired"  # the fault is disarmed while this file exists
        fault.touch()
        worker_env["POLYALIGN_INJECT_FAULT"] = f"evaluate@{fault}"
        serve_log = logs / "serve.log"
        serve = services.enter_context(topology.started(
            [sys.executable, "-m", "polyalign", "serve", str(TINY), "--name", DEPLOYMENT, "--cron", CRON],
            serve_log, sig=signal.SIGINT, stop_timeout=120, cwd=tmp_path, env=worker_env))
        yield dict(db=db, env=env, api=env["PREFECT_API_URL"], serve=serve, serve_log=serve_log, logs=logs,
                   store=tmp_path / "store", chromium=chromium, fault=fault)


@contextlib.contextmanager
def _client(api_url: str):
    """Prefect's synchronous client on `api_url` (no event loop: Playwright's sync API owns one)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            yield client


def _flow_run_named(api_url: str, name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with _client(api_url) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return runs[0] if runs else None


def _finished(api_url: str, run_id, log: Path):
    def final():
        with _client(api_url) as client:
            run = client.read_flow_run(run_id)
        return run if run.state is not None and run.state.is_final() else None

    return wait_for(final, RUN_TIMEOUT, f"flow run {run_id} to finish", interval=3, logs=log)


def _task_states(api_url: str, run_id, attempt: int = 1) -> dict[str, str]:
    """{task run name: state name} of one attempt of a flow run (a retry is attempt 2)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client(api_url) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {t.name: t.state_name for t in tasks if t.flow_run_run_count == attempt}


def _artifacts(api_url: str, run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client(api_url) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {a.key: a for a in arts}


def _field_v2(page, label: str):
    """The V2 run form's block of one parameter (its label, description and input)."""
    return page.locator("div.group").filter(has=page.locator("label", has_text=label)).last


def _custom_run(page, base: str, dep, name: str) -> None:
    """The deployment's page -> Run -> Custom run; the run's name filled in."""
    page.goto(f"{base}/v2/deployments/deployment/{dep.id}")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Custom run").click()
    page.wait_for_url("**/run**")
    page.get_by_label("Run Name").fill(name)


def _add_override(page, key: str, value: str, expect) -> None:
    """One more entry in the form's `overrides`: Add item, then its Key and Value boxes."""
    overrides = _field_v2(page, "overrides (Optional)")
    keys = overrides.get_by_label("Key", exact=True)
    n = keys.count()
    overrides.get_by_role("button", name="Add item").click()
    expect(keys).to_have_count(n + 1)
    keys.nth(n).fill(key)
    overrides.get_by_label("Value", exact=True).nth(n).fill(value)
    expect(keys.nth(n)).to_have_value(key)


def test_ui_on_postgres_deployment_form_custom_runs_tasks_and_artifacts(stack, screenshots):
    from playwright.sync_api import expect, sync_playwright

    api = stack["api"]
    base = api.removesuffix("/api")
    log = stack["serve_log"]

    def deployment():
        if stack["serve"].poll() is not None:
            raise AssertionError(f"polyalign serve exited ({stack['serve'].returncode}):\n{topology.tail(log)}")
        from prefect.exceptions import ObjectNotFound

        with _client(api) as client:
            try:
                return client.read_deployment_by_name(f"polyalign-pipeline/{DEPLOYMENT}")
            except ObjectNotFound:
                return None

    dep = wait_for(deployment, 300, "the served deployment", logs=log)
    assert [s.schedule.cron for s in dep.schedules] == [CRON]
    # the server keeps it in PostgreSQL (not a SQLite file under PREFECT_HOME)
    assert stack["db"].sql(f"select name from deployment where id = '{dep.id}'").split() == [DEPLOYMENT]
    assert not list((Path(stack["env"]["PREFECT_HOME"])).glob("*.db"))

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=stack["chromium"], headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 800}, timezone_id="UTC",
                                          locale="en-US").new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            expect.set_options(timeout=UI_TIMEOUT_MS)
            try:
                _ui(page, base, api, dep, stack, screenshots, expect)
            except BaseException:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(screenshots / "failure.png"), full_page=True)
                    (screenshots / "failure.html").write_text(page.content())
                raise
        finally:
            browser.close()


def _ui(page, base, api, dep, stack, screenshots, expect):
    log = stack["serve_log"]

    # -- the deployment's page, reached from the dashboard's navigation (the default UI: V2)
    page.goto(base + "/")
    page.get_by_role("link", name="Deployments", exact=True).click()
    page.get_by_role("link", name=DEPLOYMENT, exact=True).click()
    page.wait_for_url(f"**/deployments/deployment/{dep.id}**")
    expect(page.get_by_text(DEPLOYMENT, exact=True).first).to_be_visible()
    expect(page.get_by_text("polyalign-pipeline").first).to_be_visible()
    expect(page.get_by_text("At 03:00 AM").first).to_be_visible()  # the cron schedule, in words
    page.get_by_role("tab", name="Parameters").click()
    expect(page.get_by_text("5 parameters")).to_be_visible()
    expect(page.get_by_role("link", name="polyalign-pipeline", exact=True)).to_be_visible()  # the header has loaded
    expect(page.get_by_text("Triggers", exact=True)).to_be_visible()
    for name in ("config", "until", "overrides", "concurrency", "store"):
        expect(page.get_by_role("cell", name=name, exact=True)).to_be_visible()
    expect(page.get_by_role("cell", name=str(TINY.resolve()), exact=True)).to_be_visible()
    page.screenshot(path=str(screenshots / "deployment.png"))

    # -- Run -> Custom run: the typed form; `until` is a choice of the pipeline's stages,
    # `overrides` a list of entries (none yet) with an example
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Custom run").click()
    page.wait_for_url("**/run**")
    name1 = "ui-custom-run"
    page.get_by_label("Run Name").fill(name1)
    for label in ("config", "until (Optional)", "overrides (Optional)", "concurrency (Optional)", "store (Optional)"):
        expect(page.get_by_text(label, exact=True)).to_be_visible()
    overrides = _field_v2(page, "overrides (Optional)")
    expect(overrides).to_contain_text("key sft.train.max_steps, value 20")
    expect(overrides.get_by_role("button", name="Add item")).to_be_visible()
    expect(overrides.get_by_role("tab")).to_have_count(0)  # no list/None toggle to go through
    until = _field_v2(page, "until (Optional)")
    until.get_by_role("tab", name="str").click()
    until.get_by_role("button", name="Select").click()
    expect(page.get_by_role("option")).to_have_text(STAGES)
    page.get_by_role("option", name="evaluate", exact=True).click()
    expect(until).to_contain_text("evaluate")
    page.screenshot(path=str(screenshots / "custom-run-form.png"), full_page=True)
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_text(f"{name1} scheduled to start now")).to_be_visible()

    run1 = wait_for(lambda: _flow_run_named(api, name1), 60, f"flow run {name1}")
    assert run1.deployment_id == dep.id
    assert run1.parameters["until"] == "evaluate" and not run1.parameters.get("overrides")  # [] or left out
    run1 = _finished(api, run1.id, log)
    assert run1.state.is_completed(), f"{run1.state.name}: {run1.state.message}\n{topology.tail(log)}"

    # -- through the API: every stage (and fan-out unit) task Completed, the artifacts there
    states1 = _task_states(api, run1.id)
    assert set(STAGES) <= set(states1), states1
    assert set(states1.values()) == {"Completed"}, states1
    arts1 = _artifacts(api, run1.id)
    expected_keys = {f"polyalign-tiny-{s.replace('_', '-')}" for s in STAGES} | {TABLE_KEY, "polyalign-tiny-summary"}
    assert expected_keys <= set(arts1), sorted(arts1)
    table = arts1[TABLE_KEY]
    assert table.type == "table"
    assert set(STAGES) <= {p.name for p in stack["store"].iterdir()}  # the worker's store ($POLYALIGN_STORE)

    # -- the run's page: reached from the deployment's runs; graph, task runs, artifacts
    page.goto(f"{base}/v2/deployments/deployment/{dep.id}?tab=Runs")
    page.get_by_role("link", name=name1, exact=True).first.click()
    page.wait_for_url(f"**/runs/flow-run/{run1.id}**")
    expect(page.get_by_text("Completed").first).to_be_visible()
    expect(page.get_by_text(f"{len(states1)} Task runs")).to_be_visible()
    page.wait_for_timeout(2000)  # the run graph (a canvas) draws after the data arrives
    page.screenshot(path=str(screenshots / "flow-run.png"))
    page.get_by_role("tab", name="Task Runs").click()
    expect(page.get_by_text(f"{len(states1)} Completed").first).to_be_visible()  # the list's counts
    for stage in STAGES + ["translate[fr]", "translate[de]", "evaluate[en]", "evaluate[fr]", "evaluate[de]"]:
        expect(page.get_by_text(stage, exact=True).first).to_be_visible()
    page.screenshot(path=str(screenshots / "flow-run-task-runs.png"), full_page=True)
    page.get_by_role("tab", name="Artifacts").click()
    expect(page.get_by_text(TABLE_KEY, exact=True)).to_be_visible()
    expect(page.get_by_text("polyalign-tiny-summary", exact=True)).to_be_visible()
    page.screenshot(path=str(screenshots / "flow-run-artifacts.png"))
    page.get_by_text(TABLE_KEY, exact=True).click()
    page.wait_for_url(f"**/artifacts/key/{TABLE_KEY}**")
    page.get_by_role("link", name=str(table.id)[:8]).first.click()
    page.wait_for_url(f"**/artifacts/artifact/{table.id}**")
    for column in ("benchmark", "language", "stage", "acc"):
        expect(page.get_by_role("columnheader", name=column, exact=True)).to_be_visible()
    expect(page.get_by_role("cell", name="mini_mc", exact=True).first).to_be_visible()
    page.screenshot(path=str(screenshots / "evaluation-table.png"))

    # -- a custom run with an override entered in the form (Add item, Key, Value); only
    # `evaluate` runs again
    name2 = "ui-override-run"
    _custom_run(page, base, dep, name2)
    _add_override(page, OVERRIDE["key"], OVERRIDE["value"], expect)
    page.screenshot(path=str(screenshots / "custom-run-overrides.png"))
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_text(f"{name2} scheduled to start now").first).to_be_visible()

    run2 = wait_for(lambda: _flow_run_named(api, name2), 60, f"flow run {name2}")
    assert run2.parameters["overrides"] == [OVERRIDE]
    run2 = _finished(api, run2.id, log)
    assert run2.state.is_completed(), f"{run2.state.name}: {run2.state.message}\n{topology.tail(log)}"
    states2 = _task_states(api, run2.id)
    assert {s: states2.get(s) for s in STAGES} == {**{s: "Cached" for s in STAGES[:-1]}, "evaluate": "Completed"}, states2
    assert {states2[u] for u in ("evaluate[en]", "evaluate[fr]", "evaluate[de]")} == {"Completed"}, states2
    arts2 = _artifacts(api, run2.id)
    assert expected_keys <= set(arts2), sorted(arts2)
    assert "(cached)" in str(arts2["polyalign-tiny-sft"].data) and "(ran)" in str(arts2["polyalign-tiny-evaluate"].data)

    page.goto(f"{base}/v2/runs/flow-run/{run2.id}")
    page.get_by_role("tab", name="Task Runs").click()
    cached = sum(v == "Cached" for v in states2.values())
    expect(page.get_by_text(f"{len(states2) - cached} Completed, {cached} Cached").first).to_be_visible()
    expect(page.get_by_text("evaluate[en]", exact=True).first).to_be_visible()
    page.screenshot(path=str(screenshots / "override-run-task-runs.png"), full_page=True)

    # -- a run failed by a fault (injected once into `evaluate`'s finish step), retried from
    # its page's menu (Retry: the state AwaitingRetry): the stages before `evaluate` Cached
    stack["fault"].unlink()  # arms the fault
    name3 = "ui-retried-run"
    _custom_run(page, base, dep, name3)
    _add_override(page, "evaluate.translation.limit", "1", expect)  # evaluate runs again
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_text(f"{name3} scheduled to start now").first).to_be_visible()
    run3 = wait_for(lambda: _flow_run_named(api, name3), 60, f"flow run {name3}")
    run3 = _finished(api, run3.id, log)
    assert run3.state.is_failed() and "fault injected into evaluate" in (run3.state.message or ""), run3.state
    assert stack["fault"].exists()  # fired, and will not fire again
    page.goto(f"{base}/v2/runs/flow-run/{run3.id}")
    expect(page.get_by_text("Failed").first).to_be_visible()
    page.get_by_role("button", name="Open menu").first.click()
    page.get_by_role("menuitem", name="Retry").click()
    dialog = page.get_by_role("alertdialog")
    expect(dialog).to_contain_text("AwaitingRetry")
    dialog.get_by_role("button", name="Retry", exact=True).click()
    expect(page.get_by_text("Flow run scheduled for retry").first).to_be_visible()
    run3 = _finished(api, run3.id, log)  # AwaitingRetry now: the served process runs it again
    assert run3.run_count == 2 and run3.state.is_completed(), f"{run3.state.name}: {run3.state.message}\n{topology.tail(log)}"
    first, retried = _task_states(api, run3.id, 1), _task_states(api, run3.id, 2)
    print(f"{name3}, attempt 1: {first}\n{name3}, attempt 2 (Retry): {retried}")
    assert first["evaluate"] == "Failed", first
    assert {s: retried.get(s) for s in STAGES} == {**{s: "Cached" for s in STAGES[:-1]}, "evaluate": "Completed"}, retried
    page.reload()
    expect(page.get_by_text("Completed").first).to_be_visible()
    page.get_by_role("tab", name="Task Runs").click()
    expect(page.get_by_text("evaluate[en]", exact=True).first).to_be_visible()
    page.screenshot(path=str(screenshots / "retried-run-task-runs.png"), full_page=True)
