"""Reward-model scoring: the scalar reward of a (prompt, answer) conversation.

The reward model is a sequence classifier with one output (see `loading.load_reward_model`);
`reward_model` trains it and measures its pairwise accuracy, `evaluate` scores responses to
held-out prompts with it.
"""

from __future__ import annotations

from typing import Any


def conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def score(model: Any, tok: Any, conversations: list[list[dict[str, str]]], batch_size: int) -> list[float]:
    """Scalar rewards of whole conversations, in order."""
    import torch

    texts = [tok.apply_chat_template(c, tokenize=False) for c in conversations]
    rewards: list[float] = []
    for i in range(0, len(texts), batch_size):
        # right padding for this call only: the tokenizer may be shared with generation (left)
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            rewards.extend(model(**enc).logits[:, 0].float().tolist())
    return rewards
