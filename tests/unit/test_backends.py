"""The generation backends against a real local OpenAI-compatible server (the tiny model
served through transformers), the request journal, the ranking parser and the model specs
of API models."""

from __future__ import annotations

import time

import pytest

from polyalign.stages.core.backends import GenerationError, Request, run
from polyalign.stages.core.backends.openai import OpenAIBackend
from polyalign.stages.core.backends.transformers import TransformersBackend
from polyalign.stages.core.judge import parse_ranking, rank_prompt
from polyalign.stages.core.model_specs import ModelSpec, OpenAISpec, TinySpec, identity, models_dir, unpinned_warning
from polyalign.stages.core.prepare import ensure_model
from tests.openai_server import Faults, ModelServer


@pytest.fixture(scope="module")
def server():
    path = ensure_model(ModelSpec(tiny=TinySpec(seed=1)), models_dir())
    srv = ModelServer(path, "tiny", Faults(seed=3)).start()
    yield srv
    srv.stop()


def api(server: ModelServer, **kwargs) -> OpenAIBackend:
    settings = dict(base_url=server.base_url, model="tiny", timeout=2.0, backoff=0.01, max_backoff=2.0, max_retries=8)
    return OpenAIBackend(OpenAISpec(**{**settings, **kwargs}), "teacher", progress=False)


def requests(n: int, **kwargs) -> list[Request]:
    return [Request(key=f"r{i}", prompt=f"Task {i}: name a colour", max_new_tokens=6, seed=i, **kwargs) for i in range(n)]


def test_api_replies_equal_the_local_model(server):
    local = TransformersBackend(server.backend.model, server.backend.tok, progress=False)
    reqs = requests(4) + [Request.chat("chat", "Say hello", max_new_tokens=5)]
    remote = run(api(server), reqs)
    here = run(local, reqs)
    assert {k: (r.text, r.finish_reason) for k, r in remote.items()} == {k: (r.text, r.finish_reason) for k, r in here.items()}
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in remote.values())
    # log-likelihoods from the completions endpoint's echoed log-probabilities
    pairs = [("Rating:", " 3"), ("The sky is", " blue")]
    for (a, _), (b, _) in zip(api(server).loglikelihood(pairs), local.loglikelihood(pairs)):
        assert a == pytest.approx(b, abs=1e-4)


def test_every_injected_fault_is_retried_until_the_reply_arrives(server):
    server.faults.rate, server.faults.retry_after, server.faults.slow_seconds = 0.6, "0", 2.5
    try:
        backend = api(server, max_retries=30)
        got = run(backend, requests(40))
    finally:
        server.faults.rate, server.faults.retry_after = 0.0, "1"
    assert sorted(got) == sorted(f"r{i}" for i in range(40))
    assert backend.usage.requests == 40 and backend.usage.retries > 5
    assert set(backend.usage.retry_causes) >= {"http_429", "http_500", "http_503", "connection", "malformed", "empty_choices"}


def test_retry_after_is_honoured(server):
    server.faults.rate, server.faults.kinds, server.faults.retry_after = 1.0, ("429",), "1"
    backend = api(server, max_retries=1, backoff=0.001)
    start = time.monotonic()
    try:
        with pytest.raises(GenerationError, match="1 of 1 requests failed after 1 retries"):
            run(backend, requests(1))
    finally:
        server.faults.rate, server.faults.kinds = 0.0, Faults().kinds
    assert time.monotonic() - start >= 1.0  # waited what the server asked, not the 1 ms backoff
    assert backend.usage.retry_causes == {"http_429": 1}


def test_failed_requests_keep_the_replies_that_arrived(server, tmp_path):
    from polyalign.stages.core.store import ArtifactWriter, Store

    writer = ArtifactWriter(Store(tmp_path / "store"), "translate", "f" * 64)
    journal = writer.journal("t")
    server.faults.rate, server.faults.kinds = 1.0, ("503",)
    try:
        # half the requests fail for good: the server refuses everything after the first 4
        run(api(server), requests(4), journal)  # all fail -> raises
    except GenerationError as exc:
        assert "4 of 4 requests failed" in str(exc) and "run again" in str(exc)
    finally:
        server.faults.rate, server.faults.kinds = 0.0, Faults().kinds
    assert journal.load() == {}
    first = run(api(server), requests(4)[:2], journal)
    start = len(server.log)
    again = run(api(server), requests(4), journal)
    asked = {e["key"] for e in server.log[start:]}
    assert asked == {"r2", "r3"}  # the two journaled replies were not asked for again
    assert {k: again[k].text for k in first} == {k: r.text for k, r in first.items()}


def test_truncation_reaches_the_caller(server):
    server.faults.truncate_rate = 1.0
    try:
        got = run(api(server), [Request(key="t", prompt="Hello", max_new_tokens=20, stop=("\n",))])
    finally:
        server.faults.truncate_rate = 0.0
    assert got["t"].finish_reason == "length" and got["t"].truncated


def test_refusals_stop_at_once_with_one_line(server):
    with pytest.raises(GenerationError, match="does not serve model 'nope'"):
        run(api(server, model="nope"), requests(3))
    with pytest.raises(GenerationError, match="completions cannot send chat messages"):
        run(api(server, endpoint="completions"), [Request.chat("c", "hi")])


def test_journal_ignores_a_torn_last_line_but_not_a_torn_middle(tmp_path):
    from polyalign.stages.core.errors import CorruptPartialError
    from polyalign.stages.core.store import ArtifactWriter, Store

    journal = ArtifactWriter(Store(tmp_path / "store"), "s", "a" * 64).journal("j")
    journal.append([{"key": "a", "text": "x"}, {"key": "b", "text": "y"}])
    with open(journal.path, "ab") as f:
        f.write(b'{"key": "c", "te')  # killed in the middle of a write
    assert sorted(journal.load()) == ["a", "b"]
    journal.path.write_bytes(b'{"key": "a"}\n{"ke\n{"key": "b"}\n')
    with pytest.raises(CorruptPartialError, match="line 2 is not JSON"):
        journal.load()


def test_ranking_parser_and_prompt():
    assert parse_ranking("Ranking: B > A > C", 3) == [[1], [0], [2]]
    assert parse_ranking("Let me think.\n**Ranking:** [C] = A > B", 3) == [[2, 0], [1]]
    assert parse_ranking("Ranking: C, B, A", 3) == [[2], [1], [0]]
    assert parse_ranking("Ranking: A > B", 3) is None  # C missing
    assert parse_ranking("Ranking: A > A > B", 3) is None
    assert parse_ranking("no idea", 2) is None
    prompt = rank_prompt("French", "Dis bonjour", ["Bonjour", "Salut"])
    assert "[A]\nBonjour" in prompt and "[B]\nSalut" in prompt and "French" in prompt


def test_api_model_identity_is_its_name_and_revision_not_its_address():
    a = ModelSpec(openai=OpenAISpec(base_url="http://10.0.0.1:8000/v1", model="m"), revision="2024-06")
    b = ModelSpec(openai=OpenAISpec(base_url="https://api.example.com/v1", model="m", concurrency=64), revision="2024-06")
    c = ModelSpec(openai=OpenAISpec(base_url="http://10.0.0.1:8000/v1", model="m"), revision="2024-09")
    root = models_dir()
    assert identity(a, root) == identity(b, root) != identity(c, root)
    assert unpinned_warning("teacher", a) is None
    assert "has no revision" in (unpinned_warning("teacher", ModelSpec(openai=OpenAISpec(base_url="http://h/v1", model="m"))) or "")


def test_a_key_in_the_config_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="never put the key itself"):
        OpenAISpec(base_url="http://h/v1", model="m", api_key_env="sk-abc123-def")
    with pytest.raises(ValidationError, match="must not carry credentials"):
        OpenAISpec(base_url="http://user:secret@h/v1", model="m")


def test_vllm_missing_is_one_line(tmp_path):
    import importlib.util

    from polyalign.stages.core.errors import ConfigError
    from polyalign.stages.core.model_specs import check_available

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ConfigError, match=r"models.gen.backend: vllm is not installed .* use `openai:"):
        check_available("gen", ModelSpec(tiny=TinySpec(), backend="vllm"), tmp_path)


def test_rate_limits_hold_over_a_sliding_minute():
    """requests_per_minute and tokens_per_minute: a request that would exceed either waits
    until the oldest start in the window is a minute old (on a simulated clock)."""
    import asyncio

    from polyalign.stages.core.backends.openai import _Limiter

    def simulate(rpm, tpm, costs):
        now = [0.0]

        async def sleep(seconds):
            now[0] += seconds

        limiter = _Limiter(rpm, tpm, clock=lambda: now[0], sleep=sleep)

        async def go():
            starts = []
            for cost in costs:
                await limiter.acquire(cost)
                starts.append(now[0])
            return starts

        return asyncio.run(go())

    assert simulate(3, None, [1] * 7) == [0, 0, 0, 60, 60, 60, 120]
    # 100 tokens a minute: 60 + 30 fit, the next 30 waits for the first request's window to end
    assert simulate(None, 100, [60, 30, 30, 50]) == [0, 0, 60, 60]
    # a single request larger than the budget is not starved
    assert simulate(None, 100, [500, 10]) == [0, 60]
    assert simulate(None, None, [10**9] * 3) == [0, 0, 0]
