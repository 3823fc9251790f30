"""A real OpenAI-compatible HTTP server for tests and benchmarks: a local causal LM served
through transformers, on 127.0.0.1, with faults injected on demand.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (including
`echo` with `logprobs`, the prompt log-probabilities lm-eval and the rating judge read).
Greedy requests that arrive together are generated as one batch; a sampled request is
generated alone from its `seed`, so the same request always gets the same reply.

Faults (`fault_rate`, drawn from a seeded stream, one draw per request): 429 with
Retry-After, 500, 503, a reply slower than the client's timeout, a dropped connection,
malformed JSON, an empty `choices`. `truncate_rate` cuts replies as if the token budget
ran out (finish_reason "length"). `Faults.pick(key, body)`, when set, decides the fault of
each request instead of the draw (a kind, or None for a healthy reply); it may also name the
kinds no draw makes: "no_text" (a choice without text), "html" (an HTML page with status
200, as a proxy in front of a server may send) and the REFUSALS. Every request is logged with
its `X-Request-Key` header, what the server did with it and the text it replied.

`script(key, body, chat)`, when set, may answer a request in place of the model (a str, or
a (str, finish_reason) pair) or leave it to the model (None): it stands for a strong hosted model's answers to prompts a tiny
random model cannot answer (a judge's ranking), over the same protocol.

    python -m tests.openai_server --model DIR --name tiny-teacher --port 8000 [--fault-rate 0.3]
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable
from typing import Any

FAULTS = ("429", "500", "503", "slow", "drop", "malformed", "empty")
REFUSALS = ("400", "401", "403", "404")  # no retry can fix them


@dataclass
class Faults:
    rate: float = 0.0
    kinds: tuple[str, ...] = FAULTS
    truncate_rate: float = 0.0
    slow_seconds: float = 3.0
    retry_after: str = "1"
    seed: int = 0
    pick: Callable[[str, dict[str, Any]], str | None] | None = None


@dataclass
class _Job:
    body: dict[str, Any]
    chat: bool
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class ModelServer:
    """Owns the model, the generation worker, the faults and the request log."""

    def __init__(self, model_dir: str, name: str, faults: Faults | None = None, port: int = 0, max_batch: int = 16):
        from polyalign.stages.core.backends.transformers import TransformersBackend
        from polyalign.stages.core.loading import load_causal_lm, load_tokenizer

        self.name = name
        self.faults = faults or Faults()
        self.backend = TransformersBackend(load_causal_lm(model_dir), load_tokenizer(model_dir), name=name, batch_size=max_batch, progress=False)
        self.max_batch = max_batch
        self.log: list[dict[str, Any]] = []
        self.script: Callable[[str, dict[str, Any], bool], str | tuple[str, str] | None] | None = None
        self._log_lock = threading.Lock()
        self._rng = random.Random(self.faults.seed)
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._worker = threading.Thread(target=self._work, daemon=True)
        self._worker.start()
        server = self
        self.httpd = _QuietServer(("127.0.0.1", port), _handler(server))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "ModelServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def record(self, **entry: Any) -> None:
        with self._log_lock:
            self.log.append({"t": time.time(), **entry})

    def draw_fault(self, key: str = "", body: dict[str, Any] | None = None) -> str | None:
        if self.faults.pick is not None:
            return self.faults.pick(key, body or {})
        with self._log_lock:
            roll, kind, cut = self._rng.random(), self._rng.choice(self.faults.kinds), self._rng.random()
        if roll < self.faults.rate:
            return kind
        if cut < self.faults.truncate_rate:
            return "truncate"
        return None

    # -- generation: one worker thread, greedy requests batched ---------------------------

    def submit(self, body: dict[str, Any], chat: bool) -> Any:
        job = _Job(body, chat)
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _work(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            time.sleep(0.005)  # let the requests that arrive together form one batch
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            greedy = [j for j in jobs if float(j.body.get("temperature") or 0) == 0 and not j.body.get("echo")]
            for group in [greedy] + [[j] for j in jobs if j not in greedy]:
                if group:
                    self._run(group)

    def _run(self, jobs: list[_Job]) -> None:
        from polyalign.stages.core.backends import run

        try:  # a sampled request runs alone under key "0": its seed alone decides the sample
            if jobs[0].body.get("echo"):
                jobs[0].result = self._echo(jobs[0].body)
                return
            requests = [self._request(str(i), j) for i, j in enumerate(jobs)]
            replies = run(self.backend, requests)
            for req, job in zip(requests, jobs):
                job.result = replies[req.key]
        except BaseException as exc:  # noqa: BLE001 - handed to the request's thread
            for job in jobs:
                job.error = exc
        finally:
            for job in jobs:
                job.done.set()

    def _request(self, key: str, job: _Job) -> Any:
        from polyalign.stages.core.backends import Request

        b = job.body
        stop = b.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        common = dict(
            max_new_tokens=int(b.get("max_tokens") or b.get("max_completion_tokens") or 16),
            temperature=float(b.get("temperature") or 0),
            top_p=float(b.get("top_p") or 1),
            stop=stop,
            seed=int(b.get("seed") or 0),
            top_logprobs=int(b.get("top_logprobs") or 0) if job.chat else int(b.get("logprobs") or 0),
        )
        if job.chat:
            msgs = tuple((m["role"], m["content"]) for m in b["messages"])
            return Request(key=key, messages=msgs, **common)
        return Request(key=key, prompt=str(b["prompt"]), **common)

    def _echo(self, body: dict[str, Any]) -> dict[str, Any]:
        """Prompt log-probabilities, as `echo` with `logprobs` returns them."""
        import torch

        tok, model = self.backend.tok, self.backend.model
        text = str(body["prompt"])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        # as OpenAI-compatible servers do: the first token has no log-probability
        tokens, offsets, values, tops = [], [], [], []
        for i, t in enumerate(ids):
            offsets.append(len(tok.decode(ids[:i])) if i else 0)
            tokens.append(tok.convert_ids_to_tokens(t))
            if i == 0:
                values.append(None)
                tops.append(None)
                continue
            values.append(float(logp[i - 1, t]))
            best = int(logp[i - 1].argmax())
            tops.append({tok.convert_ids_to_tokens(best): float(logp[i - 1, best])})
        return {"tokens": tokens, "text_offset": offsets, "token_logprobs": values, "top_logprobs": tops, "n_prompt": len(ids)}


class _QuietServer(ThreadingHTTPServer):
    """A client that gives up (a timeout, or a call cancelled at the first refusal) closes its
    connections: that is no error of the server's, and it prints nothing (the tests run the
    command line in this process and read its stderr)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: the server keeps its own log
            pass

        def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": server.name, "object": "model", "owned_by": "polyalign-tests"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            key = self.headers.get("X-Request-Key", "")
            if len(raw) < length:  # the client cancelled the request while sending it
                server.record(key=key, outcome="client_gone")
                self.close_connection = True
                return
            body = json.loads(raw or b"{}")
            chat = self.path.rstrip("/") == "/v1/chat/completions"
            if not chat and self.path.rstrip("/") != "/v1/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            if body.get("model") != server.name:
                server.record(key=key, outcome="unknown_model", model=body.get("model"))
                self._send(404, {"error": {"message": f"model {body.get('model')!r} does not exist", "type": "NotFoundError"}})
                return
            auth = self.headers.get("Authorization", "")
            fault = server.draw_fault(key, body)
            server.record(key=key, outcome=fault or "accepted", auth=auth)
            if fault in REFUSALS:
                self._send(int(fault), {"error": {"message": f"refused ({fault})", "type": "invalid_request_error"}})
                return
            if fault == "html":
                page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
                return
            if fault == "no_text":
                self._send(200, {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                                 "model": server.name, "choices": [{"index": 0, "finish_reason": "stop", "text": None,
                                                                    "message": {"role": "assistant", "content": None}}]})
                return
            if fault == "429":
                self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": server.faults.retry_after})
                return
            if fault in ("500", "503"):
                self._send(int(fault), {"error": {"message": "server trouble"}})
                return
            if fault == "drop":  # close the connection without a reply
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if fault == "malformed":
                self._send(200, b'{"id": "x", "choices": [{"index": 0, "message": {"content": "unterminated')
                return
            if fault == "slow":
                time.sleep(server.faults.slow_seconds)
            if fault == "empty":
                self._send(200, {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": int(time.time()), "model": server.name, "choices": []})
                return
            try:
                scripted = server.script(key, body, chat) if server.script else None
                result = _scripted(scripted) if scripted is not None else server.submit(body, chat)
            except Exception as exc:  # noqa: BLE001 - an HTTP 500, as a real server would
                server.record(key=key, outcome="error", error=f"{type(exc).__name__}: {exc}")
                self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}"}})
                return
            payload = _completion(server, body, chat, result, truncate=fault == "truncate")
            try:
                self._send(200, payload)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                server.record(key=key, outcome="client_gone")
                return
            choice = payload["choices"][0]
            server.record(key=key, outcome="replied", text=choice["message"]["content"] if chat else choice["text"])

    return Handler


def _scripted(answer: str | tuple[str, str]) -> Any:
    from polyalign.stages.core.backends import Reply

    text, finish = (answer, "stop") if isinstance(answer, str) else answer
    return Reply(key="", text=text, finish_reason=finish, prompt_tokens=1, completion_tokens=max(1, len(text.split())))


def _completion(server: ModelServer, body: dict[str, Any], chat: bool, result: Any, truncate: bool) -> dict[str, Any]:
    base = {"id": f"cmpl-{random.getrandbits(32):08x}", "created": int(time.time()), "model": server.name}
    if isinstance(result, dict):  # echo
        lp = {k: result[k] for k in ("tokens", "text_offset", "token_logprobs", "top_logprobs")}
        return {**base, "object": "text_completion", "choices": [{"index": 0, "text": str(body["prompt"]), "finish_reason": "length", "logprobs": lp}],
                "usage": {"prompt_tokens": result["n_prompt"], "completion_tokens": 0, "total_tokens": result["n_prompt"]}}
    text, finish = result.text, result.finish_reason
    if truncate:
        text, finish = text[: max(1, len(text) // 2)], "length"
    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "total_tokens": result.prompt_tokens + result.completion_tokens}
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        if body.get("logprobs") and result.top_logprobs:
            choice["logprobs"] = {"content": [
                {"token": max(pos, key=pos.get), "logprob": max(pos.values()), "bytes": None,
                 "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in pos.items()]}
                for pos in result.top_logprobs
            ]}
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
    return {**base, "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "usage": usage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A Hugging Face model folder.")
    parser.add_argument("--name", default="local-model", help="The model name the server answers to.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--truncate-rate", type=float, default=0.0)
    args = parser.parse_args()
    server = ModelServer(args.model, args.name, Faults(rate=args.fault_rate, truncate_rate=args.truncate_rate), port=args.port).start()
    print(f"serving {args.name} at {server.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
