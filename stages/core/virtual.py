"""Adapters of virtual tokens (prompt tuning, P-tuning, prefix tuning) at inference.

Such an adapter puts n learned positions before every sequence: prompt tuning and P-tuning as
input embeddings, prefix tuning as keys and values in every layer. Under the causal mask those
positions see only each other, so their keys and values are the same for every sequence: a
constant prefix of the key/value cache, after which the real tokens sit at positions n, n+1, ...
(the positions peft's own forward gives them).

`VirtualPrefixLM` computes that prefix once and puts it before every forward pass of the model
it wraps: an empty cache it is handed is filled with the prefix, attention masks get n visible
columns in front and explicit positions move by n. The callers (the multiple-choice scorer with
its shared-prefix caches and packed rows, the generation backend's decode loop) run unchanged
and compute what peft's forward computes, with the virtual positions run once per model
instead of once per sequence.
"""

from __future__ import annotations

import inspect
from typing import Any

from polyalign.stages.core.errors import UserError

#: peft types whose adapter is a set of virtual positions (nothing merges into the weights)
PROMPT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")


def virtual_prefix(model: Any, folder: str, kind: str) -> list[tuple[Any, Any]]:
    """Per layer, the (keys, values) of the virtual positions of the adapter in `folder` on
    `model` (batch of one). peft builds the virtual inputs; the model runs them once."""
    import torch
    from peft import PeftModel

    from polyalign.stages.core.loading import LOADING, output_cache

    if kind == "MULTITASK_PROMPT_TUNING":
        raise UserError(f"{folder}: a multitask prompt tuning adapter needs a task id per request, which "
                        "evaluation does not give; train prompt_tuning or prefix_tuning instead")
    with LOADING:
        # prompt learning wraps the model without replacing any of its modules
        wrapped = PeftModel.from_pretrained(model, folder, is_trainable=False)
    wrapped.eval()
    try:
        with torch.inference_mode():
            if kind == "PREFIX_TUNING":
                cache = wrapped.get_prompt(batch_size=1, max_cache_len=wrapped.peft_config["default"].num_virtual_tokens)
            else:
                embeds = wrapped.get_prompt(batch_size=1).to(model.dtype)
                cache = output_cache(model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1))
        layers = getattr(cache, "layers", None)
        if layers is None or any(getattr(layer, "keys", None) is None for layer in layers):
            raise UserError(f"{folder}: the virtual positions of this {kind.lower()} adapter do not form a "
                            f"key/value cache for {type(model).__name__}; it cannot be evaluated")
        return [(layer.keys.detach().clone(), layer.values.detach().clone()) for layer in layers]
    finally:
        del wrapped


class VirtualPrefixLM:
    """`model` with a constant key/value prefix before every sequence (see the module text).

    Everything but the forward pass is the wrapped model's (config, device, dtype,
    parameters, generation config); `forward` keeps the wrapped model's signature, so callers
    that look at it (explicit positions, `logits_to_keep`) see what they would see."""

    def __init__(self, model: Any, prefix: list[tuple[Any, Any]]):
        from polyalign.stages.core.loading import cache_arg

        self.model = model
        self.prefix = prefix
        self.virtual_tokens = int(prefix[0][0].shape[-2])
        self._cache_arg = cache_arg(model)

        def forward(**kwargs: Any) -> Any:
            return self._forward(**kwargs)

        forward.__signature__ = inspect.signature(model.forward)  # type: ignore[attr-defined]
        self.forward = forward

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.model, name)

    def get_base_model(self) -> Any:
        return self.model

    def __call__(self, **kwargs: Any) -> Any:
        return self._forward(**kwargs)

    def prime(self, cache: Any, batch: int) -> None:
        """Put the virtual keys and values, repeated for `batch` rows, into an empty cache."""
        for layer, (keys, values) in enumerate(self.prefix):
            cache.update(keys.expand(batch, -1, -1, -1).contiguous(), values.expand(batch, -1, -1, -1).contiguous(), layer)

    def _forward(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None, **kwargs: Any) -> Any:
        import torch
        from transformers import DynamicCache

        n = self.virtual_tokens
        cache = kwargs.pop(self._cache_arg, None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        batch = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[0]
        if cache is None:
            cache = DynamicCache(config=self.model.config)
        if cache.get_seq_length() == 0:  # a cache this wrapper filled already holds the prefix
            self.prime(cache, batch)
        if attention_mask is not None:
            if attention_mask.dim() == 2:  # (rows, keys): the virtual keys are real tokens
                front = attention_mask.new_ones(attention_mask.shape[0], n)
            elif attention_mask.dtype == torch.bool:  # (rows, heads, queries, keys): visible to all
                front = attention_mask.new_ones(*attention_mask.shape[:-1], n)
            else:  # additive 4D mask: 0 is visible
                front = attention_mask.new_zeros(*attention_mask.shape[:-1], n)
            attention_mask = torch.cat([front, attention_mask], dim=-1)
        if position_ids is not None:
            position_ids = position_ids + n
        kwargs.setdefault("use_cache", True)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          **{self._cache_arg: cache}, **kwargs)
