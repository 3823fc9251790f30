"""The generation protocol every backend speaks.

A stage builds `Request`s, each with a stable `key` (record id, field, sample index), and gets
one `Reply` per request: the text, why generation stopped (`finish_reason`: "stop" or
"length"), token usage, and log-probabilities of the first tokens when asked for and given.
Backends (transformers, openai, vllm) implement `generate`; `journal.run` adds the request
journal that makes every backend resumable request by request.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from polyalign.stages.core.errors import UserError


@dataclass(frozen=True)
class Request:
    """One generation. Exactly one of `prompt` (raw text, completion style) or `messages`
    (chat turns, the backend applies the chat template) is set."""

    key: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0  # per-request sampling seed (servers that honour `seed` reproduce the reply)
    top_logprobs: int = 0  # >0: log-probabilities of that many candidates at the first tokens

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(f"request {self.key!r}: set exactly one of prompt or messages")

    @staticmethod
    def chat(key: str, user: str, system: str | None = None, **kwargs: Any) -> "Request":
        turns = ((("system", system),) if system else ()) + (("user", user),)
        return Request(key=key, messages=turns, **kwargs)


@dataclass
class Reply:
    key: str
    text: str
    finish_reason: str  # "stop" (end of text or a stop string) or "length" (token budget)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # per generated position (first few only): candidate token -> log-probability
    top_logprobs: list[dict[str, float]] | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data["top_logprobs"] is None:
            del data["top_logprobs"]
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> "Reply":
        return Reply(
            key=str(data["key"]),
            text=str(data["text"]),
            finish_reason=str(data["finish_reason"]),
            prompt_tokens=int(data.get("prompt_tokens", 0)),
            completion_tokens=int(data.get("completion_tokens", 0)),
            top_logprobs=data.get("top_logprobs"),
        )


@dataclass
class Usage:
    """Token and request counts of one backend in this process (not across resumes)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    retry_causes: dict[str, int] = field(default_factory=dict)

    def add(self, reply: Reply) -> None:
        self.requests += 1
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens


class GenerationError(UserError):
    """Requests failed for good (after retries) or the server refused them; the replies that
    arrived are in the journal, so running again asks only for the rest."""


OnReplies = Callable[[list[Reply]], None]


class Backend(Protocol):
    """Generates text for requests. `on_replies` is called as replies arrive (from any thread,
    never concurrently), so they can be journaled before the call returns."""

    name: str  # the model's entry in `models:` (for error messages)
    usage: Usage

    def generate(
        self, requests: Sequence[Request], on_replies: OnReplies, done: Collection[str] = (), desc: str = "generate"
    ) -> None: ...


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cut = min((p for p in (text.find(s) for s in stop if s) if p >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def request_seed(*parts: object) -> int:
    """A 31-bit seed from stable parts (stage seed, request key)."""
    import hashlib

    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def render_messages(messages: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in messages]
