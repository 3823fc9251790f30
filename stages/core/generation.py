"""Text generation and log-likelihood scoring with a local transformers model.

`LocalLM` batches prompts by length (longest first, left padding) and returns results in
input order. `loglikelihood` scores continuations given contexts, the primitive behind
multiple-choice evaluation and the preference judge. Backends for OpenAI-compatible servers
implement the same `generate` signature (a later issue).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    num_return_sequences: int = 1


class LocalLM:
    """A causal LM on this machine, with a token counter for the stage metrics."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, progress: bool = True):
        self.model = model
        self.tok = tokenizer
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self.tokens_in = 0
        self.tokens_out = 0

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams,
        stop: list[str] | None = None,
        desc: str = "generate",
    ) -> list[list[str]]:
        """For each prompt, `num_return_sequences` completions (text after the prompt)."""
        import torch

        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[list[str]] = [[] for _ in prompts]
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not self.progress, leave=False)
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tok(
                [prompts[i] for i in idx], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
            ).to(self.model.device)
            sample = params.temperature > 0
            kwargs: dict[str, Any] = dict(
                max_new_tokens=params.max_new_tokens,
                do_sample=sample,
                num_return_sequences=params.num_return_sequences,
                pad_token_id=self.tok.pad_token_id,
                eos_token_id=eos or None,
            )
            if stop:  # stop early on the host side too, not only when cutting the text
                kwargs.update(stop_strings=list(stop), tokenizer=self.tok)
            if sample:
                kwargs.update(temperature=params.temperature, top_p=params.top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                out = self.model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            self.tokens_in += int(enc["attention_mask"].sum()) * params.num_return_sequences
            for row, seq in enumerate(new):
                i = idx[row // params.num_return_sequences]
                mask = seq != self.tok.pad_token_id
                self.tokens_out += int(mask.sum())
                text = self.tok.decode(seq, skip_special_tokens=True)
                results[i].append(_cut(text, stop))
            bar.update(len(idx))
        bar.close()
        return results

    def loglikelihood(
        self, requests: list[tuple[str, str]], desc: str = "score"
    ) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy decode) per request.

        The context is tokenized alone and the continuation tokens are those of
        `context + continuation` after the context's tokens, as lm-evaluation-harness does.
        """
        import torch

        encoded = []
        for ctx, cont in requests:
            ctx_ids = self.tok(ctx, add_special_tokens=False)["input_ids"] if ctx else []
            whole = self.tok(ctx + cont, add_special_tokens=False)["input_ids"]
            # split at the context length; if the tokenizer merged across the boundary,
            # fall back to encoding the continuation separately
            if whole[: len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
                cont_ids = whole[len(ctx_ids) :]
            else:
                cont_ids = self.tok(cont, add_special_tokens=False)["input_ids"]
            if not ctx_ids:
                bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
                ctx_ids = [bos]
            encoded.append((ctx_ids, cont_ids))
        order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
        out: list[tuple[float, bool]] = [(math.nan, False)] * len(encoded)
        bar = tqdm(total=len(encoded), desc=desc, unit="req", disable=not self.progress, leave=False)
        pad = self.tok.pad_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            seqs = [(encoded[i][0] + encoded[i][1])[:-1] for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, s in enumerate(seqs):  # right padding keeps positions aligned
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            with torch.inference_mode():
                logits = self.model(
                    input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device)
                ).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
            self.tokens_in += int(mask.sum())
            for r, i in enumerate(idx):
                ctx_ids, cont_ids = encoded[i]
                n_ctx, n_cont = len(ctx_ids), len(cont_ids)
                rows = logprobs[r, n_ctx - 1 : n_ctx - 1 + n_cont]
                target = torch.tensor(cont_ids)
                ll = rows.gather(1, target[:, None]).sum().item()
                greedy = bool((rows.argmax(-1) == target).all())
                out[i] = (ll, greedy)
            bar.update(len(idx))
        bar.close()
        return out


def _cut(text: str, stop: list[str] | None) -> str:
    if stop:
        cut = min((p for p in (text.find(s) for s in stop) if p >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
    return text.strip()
