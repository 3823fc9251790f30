"""Content fingerprints: sha256 over canonical JSON that refuses what it cannot hash."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import PurePath
from typing import Any


class UnhashableError(TypeError):
    """A value has no stable canonical form; we refuse rather than invent a random key."""


def _canonical(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise UnhashableError(f"{path}: dict key {key!r} is not a string")
            out[key] = _canonical(item, f"{path}.{key}" if path else key)
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise UnhashableError(f"{path or 'value'}: cannot fingerprint object of type {type(value).__name__}")


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace; raises UnhashableError on odd types."""
    return json.dumps(_canonical(value, ""), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(value: Any) -> str:
    """sha256 hex digest of the canonical JSON of `value`."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def stage_fingerprint(
    *,
    stage_type: str,
    version: str,
    semantic_config: dict[str, Any],
    inputs: dict[str, str],
    models: dict[str, str],
    files: dict[str, str] | None = None,
) -> str:
    """The cache key of one stage run (see DESIGN.md, "Artifacts, caching, resume")."""
    return fingerprint(
        {
            "stage": stage_type,
            "version": version,
            "config": semantic_config,
            "inputs": inputs,
            "models": models,
            "files": files or {},
        }
    )


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
