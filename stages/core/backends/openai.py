"""The HTTP backend: any OpenAI-compatible server (vLLM, TGI, SGLang, Ollama, llama.cpp, a
hosted API), through the `openai` SDK.

Requests run concurrently on an asyncio loop in a thread of their own, at most `concurrency`
in flight, optionally held to requests- and tokens-per-minute limits. A failed try is retried
with exponential backoff and full jitter, waiting at least what a `Retry-After` (or
`retry-after-ms`) header asks; retried are 408/409/429, 5xx, timeouts, dropped connections,
bodies that are not the expected JSON and replies without choices. A refusal that no retry
can fix (401, 403, 404, other 4xx) stops the whole call at once. A request that still fails
after `max_retries` retries does not stop the others; the call raises at the end, after every
reply that arrived has been handed to `on_replies` (the journal), so running again asks only
for the missing ones.

The SDK's own retries are off (ours count causes and honour our limits). The API key is read
from the environment variable the config names and is given only to the SDK client.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import threading
import time
from collections import deque
from collections.abc import Collection, Sequence
from typing import Any

from tqdm.auto import tqdm

from polyalign.stages.core.model_specs import OpenAISpec

from .base import GenerationError, OnReplies, Reply, Request, Usage, cut_at_stop, render_messages

FATAL_STATUS = {400, 401, 403, 404, 405, 413, 422}


class _Retry(Exception):
    def __init__(self, cause: str, detail: str, wait: float | None = None):
        super().__init__(detail)
        self.cause = cause
        self.wait = wait


class _Fatal(Exception):
    pass


class _Limiter:
    """Sliding one-minute windows over request starts and (estimated) tokens."""

    def __init__(self, rpm: int | None, tpm: int | None, clock: Any = time.monotonic, sleep: Any = asyncio.sleep):
        self.rpm, self.tpm = rpm, tpm
        self.clock, self.sleep = clock, sleep  # seams for tests
        self.starts: deque[float] = deque()
        self.tokens: deque[tuple[float, int]] = deque()
        self.lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        if self.rpm is None and self.tpm is None:
            return
        async with self.lock:
            while True:
                now = self.clock()
                while self.starts and now - self.starts[0] >= 60:
                    self.starts.popleft()
                while self.tokens and now - self.tokens[0][0] >= 60:
                    self.tokens.popleft()
                used = sum(n for _, n in self.tokens)
                waits = []
                if self.rpm is not None and len(self.starts) >= self.rpm:
                    waits.append(60 - (now - self.starts[0]))
                if self.tpm is not None and self.tokens and used + tokens > self.tpm:
                    waits.append(60 - (now - self.tokens[0][0]))
                if not waits:
                    self.starts.append(now)
                    self.tokens.append((now, tokens))
                    return
                await self.sleep(max(0.01, min(waits)))


def _retry_after(headers: Any) -> float | None:
    """Seconds a response asks us to wait (retry-after-ms, or Retry-After seconds or date)."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class OpenAIBackend:
    def __init__(self, spec: OpenAISpec, name: str, progress: bool = True):
        self.spec = spec
        self.name = name
        self.progress = progress
        self.usage = Usage()
        self._rng = random.Random()

    # -- the public call ------------------------------------------------------------------

    def generate(
        self, requests: Sequence[Request], on_replies: OnReplies, done: Collection[str] = (), desc: str = "generate"
    ) -> None:
        todo = [r for r in requests if r.key not in done]
        if not todo:
            return
        failed = self._in_thread(todo, on_replies, desc, self._once)
        if failed:
            key, why = failed[-1]
            raise GenerationError(
                f"models.{self.name}: {len(failed)} of {len(todo)} requests failed after "
                f"{self.spec.max_retries} retries (last: {key}: {why}); the {len(todo) - len(failed)} "
                "replies that arrived are kept, run again to ask only for the rest"
            )

    def loglikelihood(self, requests: list[tuple[str, str]], desc: str = "score") -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy decode) per request,
        from the completions endpoint's echoed prompt log-probabilities (`echo` with
        `logprobs`, as vLLM and other servers give them). A server that does not give them
        is a one-line error."""
        reqs = [Request(key=str(i), prompt=ctx + cont, max_new_tokens=1) for i, (ctx, cont) in enumerate(requests)]
        split = {r.key: len(ctx) for r, (ctx, _) in zip(reqs, requests)}
        got: dict[str, tuple[float, bool]] = {}

        def keep(replies: list[Any]) -> None:
            for key, value in replies:
                got[key] = value

        async def call(client: Any, req: Request) -> Any:
            return await self._ll_once(client, req, split[req.key])

        failed = self._in_thread(reqs, keep, desc, call, count=False)
        if failed:
            key, why = failed[-1]
            raise GenerationError(f"models.{self.name}: {len(failed)} of {len(reqs)} scoring requests failed (last: {why})")
        return [got[r.key] for r in reqs]

    def _in_thread(self, todo: list[Request], deliver: Any, desc: str, call: Any, count: bool = True) -> list[tuple[str, str]]:
        box: dict[str, Any] = {}

        def main() -> None:  # a loop of our own, whatever the calling thread runs
            try:
                box["failed"] = asyncio.run(self._run(todo, deliver, desc, call, count))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=main, name=f"polyalign-openai-{self.name}", daemon=True)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["failed"]

    async def _ll_once(self, client: Any, req: Request, ctx_len: int) -> tuple[str, tuple[float, bool]]:
        resp = await self._send(
            lambda: client.completions.create(
                model=self.spec.model, prompt=req.prompt, max_tokens=1, temperature=0.0, echo=True, logprobs=1,
                extra_headers={"X-Request-Key": f"score/{req.key}"},
            ),
            refused="the completions endpoint refused echoed log-probabilities; this judge cannot rate, use judge_method: ranking",
        )
        choices = getattr(resp, "choices", None)
        if isinstance(resp, (str, bytes)) or not choices:
            raise _Retry("empty_choices" if choices == [] else "malformed", "reply has no choices")
        lp = getattr(choices[0], "logprobs", None)
        tokens = getattr(lp, "tokens", None)
        offsets = getattr(lp, "text_offset", None)
        values = getattr(lp, "token_logprobs", None)
        tops = getattr(lp, "top_logprobs", None) or []
        if not tokens or not offsets or values is None:
            raise _Fatal("the server returned no echoed log-probabilities; this judge cannot rate, use judge_method: ranking")
        end = len(req.prompt or "")
        total, greedy = 0.0, True
        for i, (off, value) in enumerate(zip(offsets, values)):
            if off < ctx_len or off >= end:
                continue
            if value is None:
                raise _Fatal("the server returned no log-probability for a continuation token")
            total += float(value)
            top = tops[i] if i < len(tops) and tops[i] else {}
            if top and max(top.values()) > float(value) + 1e-6:
                greedy = False
        return req.key, (total, greedy)

    def _key(self) -> str:
        env = self.spec.api_key_env
        if env is None:
            return "none"  # servers without authentication ignore it; the SDK wants a string
        value = os.environ.get(env)
        if not value:
            raise GenerationError(f"models.{self.name}.openai.api_key_env: environment variable {env} is not set")
        return value

    async def _run(self, todo: list[Request], deliver: Any, desc: str, call: Any, count: bool) -> list[tuple[str, str]]:
        import openai

        client = openai.AsyncOpenAI(
            api_key=self._key(), base_url=self.spec.base_url, timeout=self.spec.timeout, max_retries=0
        )
        limiter = _Limiter(self.spec.requests_per_minute, self.spec.tokens_per_minute)
        gate = asyncio.Semaphore(self.spec.concurrency)
        bar = tqdm(total=len(todo), desc=f"{desc} [{self.name}]", unit="req", disable=not self.progress, leave=False)
        failed: list[tuple[str, str]] = []
        reply_lock = threading.Lock()

        async def one(req: Request) -> None:
            async with gate:
                try:
                    reply = await self._with_retries(client, limiter, req, call)
                except _Retry as exc:  # out of retries
                    failed.append((req.key, f"{exc.cause}: {exc}"))
                    bar.update(1)
                    return
            with reply_lock:
                if count:
                    self.usage.add(reply)
                deliver([reply])
            bar.update(1)

        tasks = [asyncio.ensure_future(one(r)) for r in todo]
        try:
            await asyncio.gather(*tasks)
        except _Fatal as exc:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise GenerationError(f"models.{self.name}: {exc}") from None
        finally:
            bar.close()
            await client.close()
        return failed

    async def _with_retries(self, client: Any, limiter: _Limiter, req: Request, call: Any) -> Any:
        attempt = 0
        while True:
            await limiter.acquire(len(self._text_of(req)) // 4 + req.max_new_tokens)
            try:
                return await call(client, req)
            except _Retry as exc:
                if attempt >= self.spec.max_retries:
                    raise
                self.usage.retries += 1
                self.usage.retry_causes[exc.cause] = self.usage.retry_causes.get(exc.cause, 0) + 1
                cap = min(self.spec.max_backoff, self.spec.backoff * 2**attempt)
                wait = self._rng.uniform(0, cap)  # full jitter
                if exc.wait is not None:
                    wait = max(wait, min(exc.wait, self.spec.max_backoff))
                attempt += 1
                await asyncio.sleep(wait)

    def _text_of(self, req: Request) -> str:
        return req.prompt if req.prompt is not None else "".join(c for _, c in req.messages or ())

    def _chat(self, req: Request) -> bool:
        if self.spec.endpoint == "auto":
            return req.messages is not None
        return self.spec.endpoint == "chat"

    async def _once(self, client: Any, req: Request) -> Reply:
        chat = self._chat(req)
        common: dict[str, Any] = dict(
            model=self.spec.model,
            max_tokens=req.max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p if req.temperature > 0 else 1.0,
            seed=req.seed,
            extra_headers={"X-Request-Key": req.key},
        )
        if req.stop:
            common["stop"] = list(req.stop)[:4]  # the API takes at most four; the rest are cut here
        if chat:
            messages = render_messages(req.messages) if req.messages is not None else [{"role": "user", "content": req.prompt}]
            if req.top_logprobs:
                common.update(logprobs=True, top_logprobs=min(20, req.top_logprobs))
            resp = await self._send(lambda: client.chat.completions.create(messages=messages, **common))
        else:
            if req.messages is not None:
                raise _Fatal(
                    "endpoint: completions cannot send chat messages (the server would not apply "
                    "the chat template); use endpoint: chat or auto"
                )
            if req.top_logprobs:
                common.update(logprobs=min(5, req.top_logprobs))
            resp = await self._send(lambda: client.completions.create(prompt=req.prompt, **common))
        return self._reply(req, resp, chat)

    async def _send(self, make: Any, refused: str | None = None) -> Any:
        """Await one SDK call; sort its failure into a retry (with the wait a Retry-After asks
        for) or a refusal that no retry can fix (`refused` says what it means, if given)."""
        import openai

        try:
            return await make()
        except openai.APIStatusError as exc:
            status = exc.status_code
            detail = f"HTTP {status} {_short(exc)}"
            if status in (408, 409, 429) or status >= 500:
                raise _Retry(f"http_{status}", detail, _retry_after(exc.response.headers)) from None
            if status in (401, 403):
                raise _Fatal(f"the server refused the API key ({detail}); check the variable named by api_key_env") from None
            if refused is not None:
                raise _Fatal(f"{refused} (HTTP {status})") from None
            if status == 404:
                raise _Fatal(f"the server does not serve model {self.spec.model!r} at {self.spec.base_url} ({detail})") from None
            raise _Fatal(detail) from None
        except openai.APITimeoutError:
            raise _Retry("timeout", f"no reply within {self.spec.timeout} s") from None
        except openai.APIConnectionError as exc:
            raise _Retry("connection", _short(exc)) from None
        except (openai.APIResponseValidationError, ValueError, TypeError) as exc:
            raise _Retry("malformed", f"unreadable reply ({_short(exc)})") from None

    def _reply(self, req: Request, resp: Any, chat: bool) -> Reply:
        choices = getattr(resp, "choices", None)
        if isinstance(resp, (str, bytes)) or choices is None:
            raise _Retry("malformed", "reply is not a completion object")
        if not choices:
            raise _Retry("empty_choices", "reply has no choices")
        choice = choices[0]
        text = (choice.message.content if chat else choice.text) if choice is not None else None
        if not isinstance(text, str):
            raise _Retry("malformed", "choice has no text")
        text, stopped = cut_at_stop(text, req.stop)
        finish = "length" if choice.finish_reason == "length" and not stopped else "stop"
        usage = getattr(resp, "usage", None)
        return Reply(
            key=req.key,
            text=text.strip(),
            finish_reason=finish,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            top_logprobs=_logprobs(choice, chat) if req.top_logprobs else None,
        )

    # -- checks before a run ----------------------------------------------------------------

    def check(self) -> None:
        """Reachable, and serving the model: one line naming the entry otherwise."""
        import openai

        client = openai.OpenAI(api_key=self._key(), base_url=self.spec.base_url, timeout=min(10.0, self.spec.timeout), max_retries=1)
        try:
            served = [m.id for m in client.models.list()]
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise GenerationError(f"models.{self.name}: {self.spec.base_url} refused the API key (HTTP {exc.status_code})") from None
            if exc.status_code == 404:  # some servers have no model list; a request will tell
                return
            raise GenerationError(f"models.{self.name}: {self.spec.base_url}/models answered HTTP {exc.status_code}") from None
        except openai.APIConnectionError as exc:
            raise GenerationError(f"models.{self.name}: cannot reach {self.spec.base_url} ({_short(exc)})") from None
        except (openai.APIResponseValidationError, ValueError, TypeError) as exc:
            raise GenerationError(f"models.{self.name}: {self.spec.base_url}/models is not an OpenAI-compatible model list ({_short(exc)})") from None
        finally:
            client.close()
        if served and self.spec.model not in served:
            shown = ", ".join(served[:8]) + (", ..." if len(served) > 8 else "")
            raise GenerationError(f"models.{self.name}.openai.model: {self.spec.base_url} does not serve {self.spec.model!r} (serves: {shown})")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {' '.join(str(cause).split())}"
    return text[:200]


def _logprobs(choice: Any, chat: bool) -> list[dict[str, float]] | None:
    lp = getattr(choice, "logprobs", None)
    if lp is None:
        return None
    if chat:
        content = getattr(lp, "content", None) or []
        return [{t.token: float(t.logprob) for t in (pos.top_logprobs or [])} for pos in content[:4]] or None
    tops = getattr(lp, "top_logprobs", None) or []
    return [{str(k): float(v) for k, v in (pos or {}).items()} for pos in tops[:4]] or None
