"""`polyalign serve` against a real local Prefect server (`prefect server start`, SQLite in a
temporary PREFECT_HOME): the deployment is listed with its cron schedule and its typed form;
a run created through the API (as the UI's Run button does) completes with its stage task
Completed; a bad override entered as a parameter (a {key, value} entry, what the run form
sends) fails the run with the CLI's one line; Ctrl-C stops serving cleanly. A run with a
fault injected into `sft` fails naming it; retried through the API as the UI's Retry does,
it completes with the stages finished before the fault Cached."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import TINY

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
    """Run `coro_fn(client)` against the server in `env` (as a setting: Prefect reads the
    environment once, when first imported)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(go())


def _ended(env: dict, run_id, timeout: float = 600):
    """The flow run, once in a final state."""
    async def read(client):
        r = await client.read_flow_run(run_id)
        return r if r.state and r.state.is_final() else None

    return _wait(lambda: _api(env, read), timeout, f"flow run {run_id}")


def _run_to_end(env: dict, deployment_id, parameters: dict, timeout: float = 600):
    async def create(client):
        return await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)

    return _ended(env, _api(env, create).id, timeout)


def _logs(cwd) -> str:
    """The tail of `polyalign serve`'s output (see _serving)."""
    return "\n".join((cwd / name).read_text()[-3000:] for name in ("serve.out", "serve.err"))


def _deployment(env: dict, serve: subprocess.Popen, cwd):
    async def find(client):
        from prefect.exceptions import ObjectNotFound

        try:
            return await client.read_deployment_by_name("polyalign-pipeline/tiny")
        except ObjectNotFound:  # not registered yet
            return None

    def found():
        assert serve.poll() is None, f"polyalign serve exited ({serve.returncode}):\n{_logs(cwd)}"
        return _api(env, find)

    return _wait(found, 300, "the deployment")  # serve builds the tiny models first, when missing


@contextlib.contextmanager
def _serving(env: dict, cwd, *args: str):
    """`polyalign serve TINY ARGS` in `env` (its output in cwd/serve.out, serve.err); Ctrl-C
    at the end, after which it must have stopped cleanly."""
    with open(cwd / "serve.out", "w") as out, open(cwd / "serve.err", "w") as err:
        serve = subprocess.Popen([sys.executable, "-m", "polyalign", "serve", str(TINY), *args], cwd=cwd,
                                 env=env, stdout=out, stderr=err, text=True, start_new_session=True)
    try:
        yield serve
    except BaseException:
        print(f"polyalign serve's output:\n{_logs(cwd)}")
        raise
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(timeout=30)
    assert serve.returncode == 0, _logs(cwd)
    printed = (cwd / "serve.out").read_text()
    assert "serving polyalign-pipeline/tiny" in printed and "stopped serving" in printed


def test_served_deployment_runs_from_the_api_and_a_bad_override_fails_in_one_line(server, tmp_path):
    env = server
    with _serving(env, tmp_path, "--cron", "*/5 * * * *") as serve:
        dep = _deployment(env, serve, tmp_path)
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

        # the run form sends overrides as a list of {key, value} entries
        entry = {"key": "self_instruct.num_instructions", "value": "-5"}
        bad = _run_to_end(env, dep.id, {"until": "self_instruct", "store": store, "overrides": [entry]})
        assert bad.state.is_failed()
        assert bad.state.message.startswith("polyalign: stages.self_instruct.num_instructions: Input should be greater than 0")
        assert "\n" not in bad.state.message

        # the server checks parameters against the deployment's schema: a bare dict is refused
        async def as_dict(client):
            return await client.create_flow_run_from_deployment(dep.id, parameters={"overrides": {"a.b": "1"}})

        with pytest.raises(Exception, match="Validation failed for field 'overrides'"):
            _api(env, as_dict)


STAGES = ["self_instruct", "translate", "sft", "preferences", "reward_model", "align", "evaluate"]


def test_a_run_failed_by_a_fault_and_retried_through_the_api_resumes_with_the_finished_stages_cached(server, tmp_path):
    """Issue 11 (d): the fault fires once in `sft`'s finish step (retries.training is 0);
    the retry is what the UI's Retry button sends: state SCHEDULED named AwaitingRetry,
    forced. The retried run (run_count 2) reuses self_instruct and translate from the store."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import AwaitingRetry

    marker = tmp_path / "fault-fired"
    env = dict(server, POLYALIGN_INJECT_FAULT=f"sft@{marker}")
    store = tmp_path / "store"
    with _serving(env, tmp_path) as serve:
        dep = _deployment(env, serve, tmp_path)
        failed = _run_to_end(env, dep.id, {"store": str(store)}, timeout=900)
        assert marker.exists()
        assert failed.state.is_failed(), failed.state
        assert "fault injected into sft" in failed.state.message, failed.state.message
        assert failed.run_count == 1

        async def retry(client):
            return await client.set_flow_run_state(failed.id, AwaitingRetry(message="Retry from the API"), force=True)

        assert _api(env, retry).status.value == "ACCEPT"
        done = _ended(env, failed.id, timeout=900)
        assert done.state.is_completed(), f"{done.state.name}: {done.state.message}"
        assert done.run_count == 2

        async def tasks(client):
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[failed.id])))

        runs = _api(env, tasks)
        by_attempt: dict[int, dict[str, str]] = {}
        for t in sorted(runs, key=lambda t: t.name):
            by_attempt.setdefault(t.flow_run_run_count, {})[t.name] = t.state_name
        print(f"flow run {failed.name}, attempt 1 ended {failed.state.name}: {failed.state.message}")
        for attempt, states in sorted(by_attempt.items()):
            when = f"attempt {attempt}" if attempt else "never started (run count 0)"
            print(f"flow run {failed.name}, task runs {when}: " + ", ".join(f"{k}={v}" for k, v in states.items()))
        first, second = by_attempt[1], by_attempt[2]
        assert {s: first[s] for s in STAGES[:3]} == {"self_instruct": "Completed", "translate": "Completed", "sft": "Failed"}, first
        assert first["translate[fr]"] == first["translate[de]"] == "Completed", first
        # the retried run: the stages finished before the fault come from the store (translate
        # whole: its units are not run again), the rest run
        assert {s: second.get(s) for s in STAGES} == {
            "self_instruct": "Cached", "translate": "Cached", **{s: "Completed" for s in STAGES[2:]}}, second
        assert not [u for u in second if u.startswith("translate[")], second
        assert {second[f"evaluate[{lang}]"] for lang in ("en", "fr", "de")} == {"Completed"}, second
        assert set(STAGES) <= {p.name for p in store.iterdir()}
