"""Loading models into this process, and the process-wide cache of loaded models.

- `load_tokenizer`, `load_causal_lm`, `load_reward_model`: plain loaders (training stages use
  them for the model they train).
- `use_lm(path, adapters, dtype)`: a model for inference, shared by every task of the
  process. One base model stays in memory per (weights, dtype); PEFT adapters are loaded
  onto it by name and merged into it on demand, so the base, SFT and aligned variants of an
  evaluation cost one model, not three. Switching restores the base weights from a copy of
  the adapted layers taken before the first merge, so every variant computes exactly what a
  freshly merged copy would (`merge_and_unload`, adapter after adapter). Adapters of other
  kinds (IA3, LoHa, LoKr, AdaLoRA) cannot share a peft model with LoRA ones: a chain holding
  one is merged into a resident model of its own. Prompt and prefix tuning adapters merge
  into nothing: the last adapter of a chain may be one, and its virtual positions are put in
  front of every sequence as a constant key/value prefix (`virtual.VirtualPrefixLM`); the
  loaders that merge refuse them with a one-line error.
  Tasks that want the same variant share the model; a task that wants another one waits
  until the model is free.
- Tokenizers are cached per thread: a fast tokenizer is not safe to call from two threads
  at once ("Already borrowed"), and fan-out units run on a thread pool.
- `cached_reward_model`: a reward model loaded once per process.

Torch, transformers and peft are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from polyalign.stages.core.model_specs import DEFAULT_CHAT_TEMPLATE, load_kwargs
from polyalign.stages.core.virtual import PROMPT_TYPES

# Loading a model is not thread-safe: transformers builds it on the meta device by patching
# module construction for the whole process, so two loads in two threads (an evaluation unit
# and preferences, say) can leave parameters on the meta device for good. Every load in the
# process takes this lock (re-entrant: loaders call loaders).
LOADING = threading.RLock()


def device() -> str:
    """cuda (this process's GPU under a multi-process launcher: LOCAL_RANK), else cpu."""
    import os

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    local = os.environ.get("LOCAL_RANK")
    return f"cuda:{local}" if local else "cuda"


def torch_dtype(spec_dtype: str) -> Any:
    import torch

    if spec_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, spec_dtype)


def cache_arg(model: Any) -> str:
    """The forward argument that takes the key/value cache: transformers 5 renamed
    `past_key_values` to `cache` (the old name is deprecated, then removed)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The key/value cache a forward pass returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def load_tokenizer(path: str, padding_side: str = "left") -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=load_kwargs(path)["trust_remote_code"])
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def is_adapter(folder: str) -> bool:
    """A PEFT adapter folder (as opposed to a fully fine-tuned model)."""
    return (Path(folder) / "adapter_config.json").exists()


@functools.lru_cache(maxsize=1024)
def adapter_type(folder: str) -> str:
    """The peft type of an adapter folder (LORA, IA3, PROMPT_TUNING, ...); read once per folder,
    since every inference call asks (store artifacts never change)."""
    import json

    return str(json.loads((Path(folder) / "adapter_config.json").read_text()).get("peft_type", "LORA"))


def is_virtual(folder: str) -> bool:
    """An adapter of virtual tokens (prompt or prefix tuning): evaluated through
    `VirtualPrefixLM`, never merged."""
    return is_adapter(folder) and adapter_type(folder) in PROMPT_TYPES


def check_mergeable(folder: str) -> None:
    """Refuse an adapter of virtual tokens where it would have to be merged into the weights."""
    kind = adapter_type(folder)
    if kind in PROMPT_TYPES:
        from polyalign.stages.core.errors import UserError

        raise UserError(f"{folder}: a {kind.lower()} adapter adds virtual tokens, which cannot be merged into the "
                        "model; evaluate takes it, the stages that train on the SFT model need a weight adapter "
                        "(sft.lora.method: lora, dora, ia3, ...) or full/lisa")


def load_causal_lm(
    path: str, adapters: Sequence[str] | None = None, dtype: str = "auto", num_labels: int | None = None
) -> Any:
    """Load a causal LM (or, with `num_labels`, a sequence classifier on the same backbone)
    and merge the given PEFT adapters into it, in order."""
    with LOADING:
        return _load_causal_lm(path, adapters, dtype, num_labels)


def _load_causal_lm(path: str, adapters: Sequence[str] | None, dtype: str, num_labels: int | None) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = load_kwargs(path)
    try:
        if num_labels is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch_dtype(dtype), num_labels=num_labels, **kwargs
            )
    except OSError as exc:
        # a Hub repository with pickled weights only: say which setting loads it
        if kwargs.get("use_safetensors") and "safetensors" in str(exc):
            from polyalign.stages.core.errors import UserError

            raise UserError(f"{path}: no safetensors weights to load; its pickled weights load only with "
                            "allow_pickle: true in its models entry") from None
        raise
        if model.config.pad_token_id is None:
            model.config.pad_token_id = load_tokenizer(path).pad_token_id
    for adapter in adapters or []:
        from peft import PeftConfig, PeftModel

        if not is_adapter(adapter):
            # a fully fine-tuned model: it replaces what was loaded so far
            cls = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
            extra = {} if num_labels is None else {"num_labels": num_labels}
            model = cls.from_pretrained(adapter, dtype=torch_dtype(dtype), **extra, **load_kwargs(adapter))
            continue
        check_mergeable(adapter)
        config = PeftConfig.from_pretrained(adapter)
        if num_labels is not None:
            config.task_type = None  # a causal-LM adapter merged into a classifier's backbone
        model = PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload()
    model.to(device())
    model.eval()
    return model


def load_reward_model(path: str, adapters: Sequence[str], dtype: str = "auto") -> Any:
    """A reward model: sequence classifier with the SFT adapter merged, then the RM adapter
    (whose saved modules include the trained score head); or, when the last entry is a full
    model (trained layers and head), that model."""
    from peft import PeftModel

    if not is_adapter(adapters[-1]):
        return load_causal_lm(path, adapters, dtype, num_labels=1)
    with LOADING:
        model = load_causal_lm(path, adapters[:-1], dtype, num_labels=1)
        model = PeftModel.from_pretrained(model, adapters[-1]).merge_and_unload()
    model.to(device())
    model.eval()
    return model


# ----------------------------------------------------------------------------- the cache


class _Resident:
    """One base model in memory with named adapters merged into it on demand."""

    def __init__(self, path: str, dtype: str, merged: tuple[str, ...] = ()):
        self.path = path
        self.dtype = dtype
        self.base = load_causal_lm(path, merged, dtype=dtype)  # adapters that are not LoRA: merged for good
        self.peft: Any = None  # the PeftModel once an adapter is loaded
        self.names: dict[str, str] = {}  # adapter folder -> adapter name
        self.pristine: dict[str, tuple[Any, Any]] = {}  # module name -> (weight, bias) before any merge
        self.current: tuple[str, ...] = ()  # the adapter folders merged in now, in order
        self.users = 0
        self.holders: dict[int, int] = {}  # thread id -> nested uses
        self.cond = threading.Condition()
        self.virtual: dict[tuple[tuple[str, ...], str], Any] = {}  # (merged chain, adapter) -> VirtualPrefixLM
        self.virtual_lock = threading.Lock()

    def with_virtual(self, folder: str) -> Any:
        """The model as merged now, behind the virtual positions of the adapter in `folder`
        (computed once per merged chain; call inside `use`)."""
        from polyalign.stages.core.virtual import VirtualPrefixLM, virtual_prefix

        key = (self.current, folder)
        with self.virtual_lock:
            if key not in self.virtual:
                model = self.model
                self.virtual[key] = VirtualPrefixLM(model, virtual_prefix(model, folder, adapter_type(folder)))
            return self.virtual[key]

    @property
    def model(self) -> Any:
        """The transformers model (with adapter layers injected once an adapter is loaded)."""
        return self.base if self.peft is None else self.peft.get_base_model()

    def _load_adapter(self, folder: str) -> str:
        from peft import PeftModel

        if folder in self.names:
            return self.names[folder]
        name = f"adapter{len(self.names)}"
        with LOADING:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, folder, adapter_name=name)
            else:
                self.peft.load_adapter(folder, adapter_name=name)
        self.names[folder] = name
        self.peft.eval()
        return name

    def _lora_layers(self) -> Iterator[tuple[str, Any]]:
        from peft.tuners.lora import LoraLayer

        for name, module in self.peft.base_model.model.named_modules():
            if isinstance(module, LoraLayer):
                yield name, module

    def _restore(self) -> None:
        """Put back the exact base weights of every merged layer."""
        for lname, layer in self._lora_layers():
            if layer.merged_adapters:
                weight, bias = self.pristine[lname]
                base = layer.get_base_layer()
                base.weight.data.copy_(weight)
                if bias is not None:
                    base.bias.data.copy_(bias)
                layer.merged_adapters = []

    def _switch(self, adapters: tuple[str, ...]) -> None:
        """Make the model compute base + `adapters` merged in order (exactly)."""
        if adapters == self.current:
            return
        if self.peft is not None:
            self._restore()  # first: peft would unmerge by subtraction when loading an adapter
        names = [self._load_adapter(a) for a in adapters]
        self.current = adapters
        if self.peft is None:
            return
        if not names:
            self.peft.base_model.disable_adapter_layers()  # unmerged layers add nothing
            return
        self.peft.base_model.enable_adapter_layers()
        # only the chain's adapters are active: a layer that holds another adapter and none
        # of these must compute the base weights alone
        self.peft.base_model.set_adapter(names)
        for lname, layer in self._lora_layers():
            if lname not in self.pristine:  # what merging will change, copied once
                base = layer.get_base_layer()
                bias = getattr(base, "bias", None)
                self.pristine[lname] = (  # kept in host memory: it is read only to switch
                    base.weight.detach().to("cpu", copy=True),
                    bias.detach().to("cpu", copy=True) if bias is not None else None,
                )
            # one adapter per merge, each onto the weights merged so far, exactly as
            # merge_and_unload adapter after adapter: peft's multi-adapter merge would take
            # a DoRA adapter's norm against the base weights instead
            merged = []
            for name in names:
                if name in layer.lora_A:
                    layer.merged_adapters = []
                    layer.merge(adapter_names=[name])
                    merged.append(name)
            layer.merged_adapters = merged

    @contextlib.contextmanager
    def use(self, adapters: tuple[str, ...]) -> Iterator[Any]:
        me = threading.get_ident()
        with self.cond:
            while self.users and not self.merged_for(adapters):
                if me in self.holders:  # waiting for ourselves would never end
                    raise RuntimeError(
                        f"{self.path}: one task asked for two adapter sets of the same model at once; "
                        "finish with one before using the other"
                    )
                self.cond.wait()
            self._switch(adapters)
            self.users += 1
            self.holders[me] = self.holders.get(me, 0) + 1
        try:
            yield self.model
        finally:
            with self.cond:
                self.users -= 1
                self.holders[me] -= 1
                if not self.holders[me]:
                    del self.holders[me]
                self.cond.notify_all()

    def merged_for(self, adapters: tuple[str, ...]) -> bool:
        """True when the model computes exactly base + `adapters` right now."""
        return adapters == self.current


_residents: dict[tuple[str, tuple[str, ...], str], _Resident] = {}
_reward_models: dict[tuple[str, tuple[str, ...], str], Any] = {}
_tokenizers: dict[tuple[str, int], Any] = {}
_cache_lock = threading.Lock()
_key_locks: dict[tuple[Any, ...], threading.Lock] = {}


def _key_lock(key: tuple[Any, ...]) -> threading.Lock:
    """A lock per cache entry: two threads never load the same model twice."""
    with _cache_lock:
        return _key_locks.setdefault(key, threading.Lock())


def split_chain(path: str, adapters: Sequence[str]) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(weights loaded as the base, adapters merged into it once, LoRA adapters switched on
    top): a fully fine-tuned model in the chain replaces everything before it; an adapter of
    another kind (IA3, LoHa, AdaLoRA, ...) cannot share a peft model with LoRA adapters, so it
    and everything before it are merged into a model of their own."""
    chain = list(adapters)
    full = [i for i, a in enumerate(chain) if not is_adapter(a)]
    if full:
        path, chain = chain[full[-1]], chain[full[-1] + 1 :]
    for a in chain:
        check_mergeable(a)
    other = [i for i, a in enumerate(chain) if adapter_type(a) != "LORA"]
    cut = other[-1] + 1 if other else 0
    return path, tuple(chain[:cut]), tuple(chain[cut:])


def thread_tokenizer(path: str) -> Any:
    """The tokenizer of `path` for the calling thread (loaded once per thread)."""
    key = (path, threading.get_ident())
    with _cache_lock:
        tok = _tokenizers.get(key)
    if tok is None:
        tok = load_tokenizer(path)
        with _cache_lock:
            tok = _tokenizers.setdefault(key, tok)
    return tok


@contextlib.contextmanager
def use_lm(path: str, adapters: Sequence[str] = (), dtype: str = "auto") -> Iterator[tuple[Any, Any]]:
    """(model, tokenizer) for inference: `path` with `adapters` merged in order.

    The model is shared within the process and must not be modified; hold it only inside
    the `with` block. The tokenizer is the base model's, private to the calling thread.
    """
    adapters = list(adapters)
    # virtual tokens come last: the chain before them is merged, their positions put in front
    virtual = adapters.pop() if adapters and is_virtual(adapters[-1]) else None
    base, merged, chain = split_chain(path, adapters)
    key = (base, merged, dtype)
    with _key_lock(("lm", *key)):  # loading one model does not hold up users of another
        with _cache_lock:
            resident = _residents.get(key)
        if resident is None:
            resident = _Resident(base, dtype, merged)
            with _cache_lock:
                _residents[key] = resident
    tok = thread_tokenizer(path)
    with resident.use(chain) as model:
        yield (model if virtual is None else resident.with_virtual(virtual)), tok


def cached_reward_model(path: str, adapters: Sequence[str], dtype: str = "auto") -> Any:
    """A reward model (see `load_reward_model`) loaded once per process."""
    key = (path, tuple(adapters), dtype)
    with _key_lock(("rm", *key)):
        with _cache_lock:
            model = _reward_models.get(key)
        if model is None:
            model = load_reward_model(path, adapters, dtype)
            with _cache_lock:
                _reward_models[key] = model
        return model


def release_models() -> None:
    """Drop the process-wide model caches (and free accelerator memory)."""
    import gc

    with _cache_lock:
        _residents.clear()
        _reward_models.clear()
        _tokenizers.clear()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
