"""Typed stage configs and the split between semantic and runtime-only fields.

Every stage declares `class Config(StageConfig)`. Fields that change *how* a stage runs but
not *what* it produces (inference batch size, device, concurrency, progress bars) are marked
with `runtime_field`; they are left out of the fingerprint. Fields that name a model from the
pipeline's `models:` table are marked with `model_field`; the fingerprint replaces the name
with the model's identity, so renaming a model entry does not invalidate the cache while
swapping its weights does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from polyalign.stages.core.checked import Checked

_RUNTIME = "polyalign_runtime"
_MODEL_REF = "polyalign_model_ref"
_REMOTE_OK = "polyalign_remote_ok"
_DATA_FILE = "polyalign_data_file"


def runtime_field(default: Any, description: str, **kwargs: Any) -> Any:
    """A field that does not change a stage's outputs (excluded from fingerprints)."""
    return Field(default, description=description, json_schema_extra={_RUNTIME: True}, **kwargs)


def model_field(description: str, default: Any = ..., remote_ok: bool = False, **kwargs: Any) -> Any:
    """A field holding the name of an entry in the pipeline's `models:` table.

    `remote_ok`: the stage only generates text with this model, so it may be an API model
    (`openai:`); otherwise it needs local weights (training, adapters, log-likelihoods).
    """
    extra: dict[str, Any] = {_MODEL_REF: True, _REMOTE_OK: remote_ok}
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def data_file_field(builtin: str, description: str) -> Any:
    """A field naming a data file, or 'builtin' for the file `builtin` shipped in stages/data.

    The fingerprint hashes the file's *content*, so editing the file invalidates the cache.
    """
    return Field("builtin", description=description, json_schema_extra={_DATA_FILE: builtin})


class StageConfig(Checked):
    """Base of every stage config: strict keys, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def model_refs(self) -> dict[str, str]:
        """Map of dotted field path -> model name for every model reference in this config."""
        refs: dict[str, str] = {}
        _walk_refs(self, "", refs)
        return refs

    def local_model_refs(self) -> set[str]:
        """Dotted paths of the model references that need local weights."""
        refs: dict[str, str] = {}
        _walk_refs(self, "", refs, local_only=True)
        return set(refs)

    def data_files(self) -> dict[str, str]:
        """Map of field name -> resolved path of every data-file field (top level only)."""
        from polyalign.stages.core.io import builtin

        files = {}
        for name in type(self).model_fields:
            shipped = _extra(self, name).get(_DATA_FILE)
            if shipped:
                value = getattr(self, name)
                files[name] = str(builtin(shipped)) if value == "builtin" else value
        return files

    def semantic_dict(self) -> dict[str, Any]:
        """The config as plain data, runtime-only fields removed (what the fingerprint sees)."""
        return _semantic(self)


def _extra(model: BaseModel, name: str) -> dict[str, Any]:
    extra = type(model).model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _walk_refs(model: BaseModel, prefix: str, out: dict[str, str], local_only: bool = False) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        extra = _extra(model, name)
        if extra.get(_MODEL_REF):
            if value is None or (local_only and extra.get(_REMOTE_OK)):
                continue
            if isinstance(value, dict):  # a table of models, e.g. one per language
                out.update({f"{path}.{key}": name for key, name in value.items()})
            else:
                out[path] = value
        elif isinstance(value, BaseModel):
            _walk_refs(value, path + ".", out, local_only)


def _semantic(model: BaseModel) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name in type(model).model_fields:
        extra = _extra(model, name)
        if extra.get(_RUNTIME) or extra.get(_MODEL_REF) or extra.get(_DATA_FILE):
            continue  # models and data files enter the fingerprint as identities / digests
        data[name] = _plain(getattr(model, name))
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _semantic(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def is_runtime_field(model_cls: type[BaseModel], name: str) -> bool:
    extra = model_cls.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(_RUNTIME))
