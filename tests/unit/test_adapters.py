"""Placement presets resolve to each architecture's own module names; a preset that matches
nothing is a one-line error naming the modules there are; method settings that do not fit
the method are refused."""

from __future__ import annotations

import pytest

ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}
ARCHS = {
    "llama": (ATTN, MLP),
    "mistral": (ATTN, MLP),
    "qwen2": (ATTN, MLP),
    "gemma": (ATTN, MLP),
    "gemma3_text": (ATTN, MLP),
    "bloom": ({"query_key_value", "dense"}, {"dense_h_to_4h", "dense_4h_to_h"}),
}


def _tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_layer=2, n_head=4)
    config = AutoConfig.for_model(model_type, **sizes)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_presets_resolve_per_architecture(arch):
    from polyalign.stages.core.adapters import resolve_placement

    model = _tiny(arch)
    attn, mlp = ARCHS[arch]
    assert set(resolve_placement(model, "attention")) == attn
    assert set(resolve_placement(model, "mlp")) == mlp
    assert set(resolve_placement(model, "attention_mlp")) == attn | mlp
    assert set(resolve_placement(model, "all_linear")) == attn | mlp


def test_preset_matching_nothing_names_what_was_found():
    import torch

    from polyalign.stages.core.adapters import resolve_placement
    from polyalign.stages.core.errors import UserError

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = torch.nn.Module()
            self.mixer.proj = torch.nn.Linear(8, 8)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

    with pytest.raises(UserError) as err:
        resolve_placement(Model(), "mlp")
    message = str(err.value)
    assert "\n" not in message and "sft.lora.placement=mlp matches no module of Model" in message
    assert "proj (other)" in message
    assert resolve_placement(Model(), "all_linear") == ["proj"]


@pytest.mark.parametrize("settings, field", [
    ({"method": "lora", "init_text": "hi"}, "init_text"),
    ({"method": "lisa", "placement": "mlp"}, "placement"),
    ({"placement": "mlp", "target_modules": ["q_proj"]}, "placement"),
    ({"method": "lora_plus"}, "method"),
])
def test_settings_that_do_not_fit_the_method_are_refused(settings, field):
    from pydantic import ValidationError

    from polyalign.stages.core.adapters import SftPeftSettings

    with pytest.raises(ValidationError) as err:
        SftPeftSettings(**settings)
    assert field in str(err.value)


def test_ia3_scales_the_inputs_of_mlp_modules_and_the_outputs_of_the_others():
    from polyalign.stages.core.adapters import SftPeftSettings, build_peft_config

    config = build_peft_config(SftPeftSettings(method="ia3", placement="attention_mlp"), _tiny("llama"), "unused", 10)
    assert set(config.target_modules) == ATTN | MLP and set(config.feedforward_modules) == MLP


@pytest.mark.parametrize("arch, apart", [("llama", True), ("gemma3_text", True), ("qwen2", True), ("bloom", False)])
def test_padding_free_only_where_the_model_keeps_packed_sequences_apart(arch, apart):
    from polyalign.stages.sft import keeps_sequences_apart

    model = _tiny(arch)
    model.train()
    assert keeps_sequences_apart(model) is apart
    assert model.training  # left as it was
