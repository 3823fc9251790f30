"""TRL's fused LM head inside `labelled_positions_only`: on a CPU it projects only the
positions that carry a label (prompt and padding skipped), and the loss and every gradient
equal those of projecting every position, as TRL does on a CPU by itself."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_the_head_projects_only_labelled_positions_with_the_same_loss_and_gradients(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer import utils as trl_utils

    from polyalign.stages.core.training import labelled_positions_only

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config)
    trl_utils.add_fused_lm_head(model)
    ids = torch.randint(0, 300, (2, 12))
    labels = ids.clone()
    labels[:, :7] = -100  # the prompt
    labels[1, 10:] = -100  # padding of the shorter row
    rows: list[int] = []
    original = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *args):  # noqa: ANN001, ANN002
        rows.append(int(hidden.shape[0]))
        return original(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)

    def step() -> tuple[float, list]:
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return float(out.loss), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    every_loss, every_grads = step()
    with labelled_positions_only():
        compact_loss, compact_grads = step()
    step()  # the hook is gone again after the block
    labelled = int((labels[:, 1:] != -100).sum())
    assert rows == [2 * 11, labelled, 2 * 11] and labelled == 8
    assert compact_loss == pytest.approx(every_loss, abs=1e-6)
    assert len(compact_grads) == len(every_grads) > 0
    for a, b in zip(compact_grads, every_grads):
        assert torch.allclose(a, b, atol=1e-6)
