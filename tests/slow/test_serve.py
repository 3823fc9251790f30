"""`polyalign serve` against a real local Prefect server (`prefect server start`, SQLite in a
temporary PREFECT_HOME): the deployment is listed with its cron schedule and its typed form;
a run created through the API (as the UI's Run button does) completes with its stage task
Completed; a bad override entered as a parameter fails the run with the CLI's one line;
Ctrl-C stops serving cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(lambda: _healthy(url), 120, "the Prefect server")
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _api(env: dict, coro_fn):
    """Run `coro_fn(client)` against the server in `env`."""
    code = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
    try:
        from prefect.client.orchestration import get_client

        async def go():
            async with get_client() as client:
                return await coro_fn(client)

        return asyncio.run(go())
    finally:
        if code is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = code


def _run_to_end(env: dict, deployment_id, parameters: dict):
    async def create(client):
        return await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)

    run = _api(env, create)

    async def read(client):
        r = await client.read_flow_run(run.id)
        return r if r.state and r.state.is_final() else None

    return _wait(lambda: _api(env, read), 600, f"flow run {run.name}")


def test_served_deployment_runs_from_the_api_and_a_bad_override_fails_in_one_line(server, tmp_path):
    env = server
    serve = subprocess.Popen([sys.executable, "-m", "polyalign", "serve", str(TINY), "--cron", "*/5 * * * *"], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        async def find(client):
            try:
                return await client.read_deployment_by_name("polyalign-pipeline/tiny")
            except Exception:  # not registered yet
                return None

        dep = _wait(lambda: _api(env, find), 120, "the deployment")
        assert [s.schedule.cron for s in dep.schedules] == ["*/5 * * * *"]
        assert dep.parameters["config"] == str(TINY.resolve())
        until = dep.parameter_openapi_schema["properties"]["until"]
        assert ["self_instruct", "translate", "sft"] == [o for o in until["anyOf"] if "enum" in o][0]["enum"][:3]
        listed = subprocess.run([sys.executable, "-m", "prefect", "deployment", "ls"], env=env, capture_output=True, text=True, timeout=120)
        assert "polyalign-pipeline/tiny" in listed.stdout

        store = str(tmp_path / "store")
        good = _run_to_end(env, dep.id, {"until": "self_instruct", "store": store})
        assert good.state.is_completed(), good.state.message

        async def tasks(client):
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[good.id])))

        states = {t.name: t.state_name for t in _api(env, tasks)}
        assert states == {"self_instruct": "Completed"}
        assert any(p.name.endswith(".lock") is False for p in (tmp_path / "store" / "self_instruct").iterdir())

        bad = _run_to_end(env, dep.id, {"until": "self_instruct", "store": store, "overrides": {"self_instruct.num_instructions": "-5"}})
        assert bad.state.is_failed()
        assert bad.state.message.startswith("polyalign: stages.self_instruct.num_instructions: Input should be greater than 0")
        assert "\n" not in bad.state.message
    finally:
        serve.send_signal(signal.SIGINT)
        out, err = serve.communicate(timeout=120)
    assert serve.returncode == 0, err[-2000:]
    assert "serving polyalign-pipeline/tiny" in out and "stopped serving" in out
