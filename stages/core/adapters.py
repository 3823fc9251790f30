"""The fine-tuning methods SFT offers, and where their adapters go.

- `SftPeftSettings`: the `sft.lora` block. Adapter methods through peft (lora, dora, rslora,
  pissa, adalora, ia3, loha, lokr, prompt_tuning, prefix_tuning, qlora), full fine-tuning,
  and LISA (see `core.lisa`).
- `resolve_placement`: a placement preset (attention, mlp, attention_mlp, all_linear) as the
  names of the linear modules of the model's decoder layers. Modules are grouped by the
  block that holds them (`self_attn`, `self_attention`, `attention` or `mlp`), which covers
  Llama, Gemma, Mistral, Qwen and BLOOM without a table per architecture.
- `build_peft_config`: the peft config of a method, or None for full fine-tuning and LISA.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from polyalign.stages.core.errors import UserError
from polyalign.stages.core.training import PeftSettings

Method = Literal[
    "lora", "dora", "rslora", "pissa", "adalora", "ia3", "loha", "lokr",
    "prompt_tuning", "prefix_tuning", "full", "qlora", "lisa",
]
Placement = Literal["attention", "mlp", "attention_mlp", "all_linear"]

PROMPT_METHODS = ("prompt_tuning", "prefix_tuning")  # virtual tokens: nothing merges into the weights
FULL_METHODS = ("full", "lisa")  # the artifact is a whole model

METHOD_HELP = (
    "lora; dora (weight-decomposed LoRA); rslora (LoRA scaled by alpha/sqrt(r)); pissa (LoRA started "
    "from the principal singular vectors, saved as a plain LoRA); adalora (rank budget reallocated "
    "during training, r is the final rank); ia3 (learned scaling vectors); loha (Hadamard product of "
    "low-rank pairs); lokr (Kronecker product); prompt_tuning (num_virtual_tokens learned input "
    "embeddings, optionally started from init_text); prefix_tuning (learned keys and values of "
    "num_virtual_tokens in every layer); qlora (LoRA on a 4-bit base through bitsandbytes); "
    "full (every weight); lisa (embeddings and head always, plus lisa_layers decoder layers drawn "
    "every lisa_interval steps)."
)


class SftPeftSettings(PeftSettings):
    """How SFT fine-tunes: the method and its settings (`sft.lora`)."""

    method: Method = Field("lora", description=METHOD_HELP)  # type: ignore[assignment]
    placement: Placement | None = Field(
        None,
        description="Adapter placement preset, resolved per architecture: attention, mlp, attention_mlp, "
        "all_linear (every linear module of the decoder layers). None: target_modules decides.",
    )
    num_virtual_tokens: int = Field(20, gt=0, description="prompt_tuning, prefix_tuning: learned virtual tokens.")
    init_text: str | None = Field(
        None,
        min_length=1,
        description="prompt_tuning: start the virtual tokens from the embeddings of this text (SK-Tuning's "
        "semantic initialisation) instead of at random.",
    )
    lisa_layers: int = Field(2, gt=0, description="lisa: decoder layers that train at a time (gamma).")
    lisa_interval: int = Field(20, gt=0, description="lisa: draw new layers every this many optimizer steps (K).")

    @model_validator(mode="after")
    def _fits_method(self) -> "SftPeftSettings":
        if self.init_text is not None and self.method != "prompt_tuning":
            raise ValueError(f"init_text: only prompt_tuning starts from a text (method is {self.method})")
        if self.placement is not None and self.target_modules != "all-linear":
            raise ValueError("placement: set either placement or target_modules, not both")
        if self.placement is not None and self.method in PROMPT_METHODS + FULL_METHODS:
            raise ValueError(f"placement: {self.method} puts no adapter on modules")
        return self


# ----------------------------------------------------------------------------- placement

_ATTENTION = re.compile(r"attn|attention", re.I)
_MLP = re.compile(r"mlp|feed_forward|ffn", re.I)


def decoder_layers(model: Any) -> tuple[str, Any]:
    """(dotted name, ModuleList) of the model's decoder layers: the module list holding the
    most parameters."""
    import torch

    best: tuple[int, str, Any] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module):
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise UserError(f"{type(model).__name__}: no list of decoder layers found")
    return best[1], best[2]


def linear_modules(model: Any) -> dict[str, str]:
    """Leaf name -> group ('attention', 'mlp' or 'other') of every linear module in the
    decoder layers (from the first layer; every layer has the same modules)."""
    import torch

    _, layers = decoder_layers(model)
    found: dict[str, str] = {}
    for name, module in layers[0].named_modules():
        if not isinstance(module, torch.nn.Linear) and type(module).__name__ != "Conv1D":
            continue
        parent, _, leaf = name.rpartition(".")
        group = "attention" if _ATTENTION.search(parent) else "mlp" if _MLP.search(parent) else "other"
        found.setdefault(leaf, group)
    return found


def resolve_placement(model: Any, placement: str, field: str = "sft.lora.placement") -> list[str]:
    """The leaf names of the linear modules a placement preset puts adapters on."""
    found = linear_modules(model)
    groups = {"attention": {"attention"}, "mlp": {"mlp"}, "attention_mlp": {"attention", "mlp"},
              "all_linear": {"attention", "mlp", "other"}}[placement]
    names = [leaf for leaf, group in found.items() if group in groups]
    if not names:
        listed = ", ".join(f"{leaf} ({group})" for leaf, group in found.items()) or "none"
        raise UserError(f"{field}={placement} matches no module of {type(model).__name__}; "
                        f"linear modules of its decoder layers: {listed}")
    return names


def check_target_modules(model: Any, targets: Any, field: str = "sft.lora.target_modules") -> Any:
    """`targets` as given, once every name in a list names a module of `model` (peft matches a
    name against the end of each module's dotted name); a one-line error listing the linear
    modules of the decoder layers otherwise. 'all-linear' passes as it is."""
    if not isinstance(targets, list):
        return targets
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        listed = ", ".join(linear_modules(model)) or "none"
        raise UserError(f"{field}: {', '.join(missing)} names no module of {type(model).__name__} "
                        f"(linear modules of its decoder layers: {listed})")
    return targets


def _targets(p: SftPeftSettings, model: Any) -> Any:
    return resolve_placement(model, p.placement) if p.placement else check_target_modules(model, p.target_modules)


# ----------------------------------------------------------------------------- configs


def build_peft_config(p: SftPeftSettings, model: Any, tokenizer_path: str, total_steps: int) -> Any:
    """The peft config that fine-tunes `model` by `p.method` (None: full fine-tuning, LISA)."""
    import peft

    task = "CAUSAL_LM"
    m = p.method
    if m in FULL_METHODS:
        return None
    if m == "prompt_tuning":
        init = {"prompt_tuning_init": "RANDOM"}
        if p.init_text:
            init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": p.init_text,
                    "tokenizer_name_or_path": tokenizer_path}
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=p.num_virtual_tokens, **init)
    if m == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=p.num_virtual_tokens)
    targets = _targets(p, model)
    if m == "ia3":
        if targets == "all-linear":
            targets = resolve_placement(model, "all_linear")
        groups = linear_modules(model)
        # feed-forward modules scale their input, the others their output (IA3's rule)
        return peft.IA3Config(task_type=task, target_modules=targets,
                              feedforward_modules=[t for t in targets if groups.get(t) == "mlp"])
    if m == "loha":
        return peft.LoHaConfig(task_type=task, r=p.r, alpha=p.alpha, module_dropout=p.dropout, target_modules=targets)
    if m == "lokr":
        return peft.LoKrConfig(task_type=task, r=p.r, alpha=p.alpha, module_dropout=p.dropout, target_modules=targets)
    if m == "adalora":
        # starts at 1.5x the rank and prunes to r by the end of training
        return peft.AdaLoraConfig(task_type=task, target_r=p.r, init_r=p.r + (p.r + 1) // 2, lora_alpha=p.alpha,
                                  lora_dropout=p.dropout, target_modules=targets, total_step=max(total_steps, 2))
    return peft.LoraConfig(
        task_type=task,
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=targets,
        use_dora=m == "dora",
        use_rslora=m == "rslora",
        init_lora_weights="pissa" if m == "pissa" else True,  # pissa: exact SVD, the same on every rerun
    )


def quantization_config() -> Any:
    """QLoRA's 4-bit NF4 base, after checking that bitsandbytes runs on this device."""
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("sft.lora.method=qlora needs bitsandbytes, which is not installed here "
                        "(pip install 'polyalign[qlora]')")
    from polyalign.stages.core.loading import device

    try:  # a 4-bit layer, quantised and run once where the model will run
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(device())
        layer(torch.ones(1, 64, device=device()))
    except Exception as exc:  # noqa: BLE001 - any failure means it cannot run here
        raise UserError(f"sft.lora.method=qlora: the installed bitsandbytes cannot run 4-bit layers on "
                        f"{device()} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def adalora_callback() -> Any:
    """AdaLoRA reallocates its rank budget from the gradients after every optimizer step."""
    from transformers import TrainerCallback

    class Allocate(TrainerCallback):
        def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            inner = getattr(model, "module", model)  # unwrapped from DDP
            inner.base_model.update_and_allocate(state.global_step)

    return Allocate()


def sft_model(art: Any, lang: str | None = None, stage: str = "this stage", merges: bool = True) -> str:
    """The model folder of an sft artifact; with per-language plugins, the plugin of `lang`
    (a stage that takes one SFT model for every language gets a one-line error). A stage that
    `merges` the model (samples from it to train on, or trains on top of it) refuses virtual
    tokens (prompt or prefix tuning) in one line before any work."""
    plugins = art.metrics.get("plugins")
    if not plugins:
        folder = str(art.file("model"))
        if merges:
            from polyalign.stages.core.loading import check_mergeable, is_adapter

            if is_adapter(folder):
                check_mergeable(folder)
        return folder
    if lang is None:
        raise UserError(f"sft has one plugin per language ({', '.join(plugins)}) and {stage} takes one SFT model; "
                        "set sft.per_language: false for a pipeline that goes on past evaluate")
    if lang not in plugins:
        raise UserError(f"sft has no plugin for language {lang!r} (plugins: {', '.join(plugins)}); "
                        "add it to sft.languages")
    return str(art.file(f"model/{lang}"))
