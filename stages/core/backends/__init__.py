"""Generation backends: one protocol (`base`), one module per backend, the request journal.

Stages build `Request`s with stable keys and call `run(backend, requests, journal)`; they never
import an HTTP client or vLLM. `open_backend` turns an entry of the pipeline's `models:` table
into a backend: `transformers` (in process, batched), `vllm` (in process, GPU) or `openai`
(any OpenAI-compatible server).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .base import Backend, GenerationError, Reply, Request, Usage, cut_at_stop, request_seed

if TYPE_CHECKING:
    from polyalign.stages.core.model_specs import ModelSpec
    from polyalign.stages.core.store import Journal

__all__ = [
    "Backend", "GenerationError", "Reply", "Request", "Usage", "cut_at_stop", "request_seed",
    "open_backend", "run", "usage_of", "check_remote",
]


@contextmanager
def open_backend(
    name: str,
    spec: "ModelSpec",
    path: str | None,
    adapters: Sequence[str] = (),
    batch_size: int = 8,
    progress: bool = True,
) -> Iterator[Any]:
    """The backend of models entry `name` (`path`: its local weights, None for API models)."""
    if spec.openai is not None:
        if adapters:
            raise GenerationError(f"models.{name}: an API model cannot take the pipeline's adapters")
        from .openai import OpenAIBackend

        yield OpenAIBackend(spec.openai, name, progress=progress)
        return
    assert path is not None
    if spec.backend == "vllm":
        from .vllm import VLLMBackend

        yield VLLMBackend(path, name, adapters, spec.dtype)
        return
    from polyalign.stages.core.loading import use_lm

    from .transformers import TransformersBackend

    with use_lm(path, adapters, spec.dtype) as (model, tok):
        yield TransformersBackend(model, tok, name=name, batch_size=batch_size, progress=progress)


def run(backend: Backend, requests: Sequence[Request], journal: "Journal | None" = None, desc: str = "generate") -> dict[str, Reply]:
    """Replies to `requests` by key: those already in `journal`, the rest generated now and
    appended to it as they arrive (so a killed run never asks again for what it has).
    Without a journal (tests, benchmarks) nothing is kept beyond the call."""
    keys = [r.key for r in requests]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"request key {dup!r} is used twice")
    have = {k: Reply.from_json(row) for k, row in journal.load().items()} if journal is not None else {}
    done = {k for k in keys if k in have}

    def record(replies: list[Reply]) -> None:
        if journal is not None:
            journal.append([r.to_json() for r in replies])
        for r in replies:
            have[r.key] = r

    backend.generate(requests, record, done=done, desc=desc)
    missing = [k for k in keys if k not in have]
    if missing:  # a backend that returned without answering everything is a bug, not a user error
        raise RuntimeError(f"{backend.name}: no reply for {len(missing)} requests (first: {missing[0]})")
    return {k: have[k] for k in keys}


def usage_of(replies: Sequence[Reply]) -> dict[str, int]:
    return {
        "requests": len(replies),
        "prompt_tokens": sum(r.prompt_tokens for r in replies),
        "completion_tokens": sum(r.completion_tokens for r in replies),
    }


def check_remote(models: dict[str, "ModelSpec"], used: set[str]) -> None:
    """Before any stage starts: every API model in `used` is reachable and served."""
    from .openai import OpenAIBackend

    for name in sorted(used):
        spec = models[name]
        if spec.openai is not None:
            OpenAIBackend(spec.openai, name, progress=False).check()
