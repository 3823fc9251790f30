"""Task retries in a flow run: a fan-out unit that fails once is retried and the run
completes; with retries off the run fails naming the unit, and the next run resumes with the
finished stages Cached (a fault injected with POLYALIGN_INJECT_FAULT)."""

from __future__ import annotations

import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.integration


def test_a_unit_that_fails_once_is_retried_and_the_run_completes(prefect_harness, tmp_path, monkeypatch):
    from polyalign.flows.pipeline import polyalign_flow

    marker = tmp_path / "fault-fired"
    monkeypatch.setenv("POLYALIGN_INJECT_FAULT", f"translate/de@{marker}")
    states = polyalign_flow(str(TINY), ["retries.delay_seconds=0"], "translate", str(tmp_path / "store"))
    assert marker.exists()  # the first attempt failed
    assert states == {"self_instruct": "Completed", "translate": "Completed"}


def test_without_retries_the_run_fails_and_the_next_one_resumes_from_the_store(prefect_harness, tmp_path, monkeypatch):
    from polyalign.flows.pipeline import polyalign_flow

    marker = tmp_path / "fault-fired"
    monkeypatch.setenv("POLYALIGN_INJECT_FAULT", f"translate/de@{marker}")
    store = str(tmp_path / "store")
    state = polyalign_flow(str(TINY), ["retries.units=0"], "translate", store, return_state=True)
    assert state.is_failed()
    assert "stage translate: units ['de'] failed" in state.message and "['fr'] finished and are kept" in state.message
    again = polyalign_flow(str(TINY), ["retries.units=0"], "translate", store)
    assert again == {"self_instruct": "Cached", "translate": "Completed"}
