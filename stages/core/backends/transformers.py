"""The in-process backend: a causal LM loaded with transformers, batched.

Requests are grouped by their sampling settings, sorted by prompt length (longest first, so
padding is small) and cut into batches of `batch_size`; each batch is left-padded and
generated with `model.generate`, which stops each row at EOS or at a stop string. Replies come
back per batch, in any order; the caller maps them by key.

Batches are planned over all requests, including those already answered (`done`), and a
sampled batch is seeded from its own requests' seeds: a batch that is generated again after a
crash draws the same samples, so a resumed run equals an uninterrupted one.

`loglikelihood` scores continuations given contexts (the judge's ratings).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

from tqdm.auto import tqdm

from .base import OnReplies, Reply, Request, Usage, cut_at_stop, render_messages, request_seed


class TransformersBackend:
    def __init__(self, model: Any, tokenizer: Any, name: str = "local", batch_size: int = 8, progress: bool = True):
        self.model = model
        self.tok = tokenizer
        self.name = name
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self.usage = Usage()

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        turns = ((("system", system),) if system else ()) + (("user", user),)
        return self.prompt_text(Request(key="", messages=turns))

    def prompt_text(self, req: Request) -> str:
        if req.prompt is not None:
            return req.prompt
        assert req.messages is not None
        return self.tok.apply_chat_template(render_messages(req.messages), tokenize=False, add_generation_prompt=True)

    def plan(self, requests: Sequence[Request]) -> list[list[int]]:
        """Batches of request indices: same settings, similar lengths, longest first."""
        texts = [self.prompt_text(r) for r in requests]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.max_new_tokens, r.temperature, r.top_p, r.stop, r.top_logprobs), []).append(i)
        batches = []
        for idx in groups.values():
            idx = sorted(idx, key=lambda i: (-len(texts[i]), i))
            batches += [idx[s : s + self.batch_size] for s in range(0, len(idx), self.batch_size)]
        return batches

    def generate(
        self, requests: Sequence[Request], on_replies: OnReplies, done: Collection[str] = (), desc: str = "generate"
    ) -> None:
        bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not self.progress, leave=False)
        for batch in self.plan(requests):
            if all(requests[i].key in done for i in batch):
                bar.update(len(batch))
                continue
            replies = self._batch([requests[i] for i in batch])
            fresh = [r for r in replies if r.key not in done]
            for reply in fresh:
                self.usage.add(reply)
            on_replies(fresh)
            bar.update(len(batch))
        bar.close()

    def _batch(self, reqs: list[Request]) -> list[Reply]:
        import torch

        first = reqs[0]
        enc = self.tok(
            [self.prompt_text(r) for r in reqs], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        ).to(self.model.device)
        eos = self.tok.eos_token_id
        kwargs: dict[str, Any] = dict(
            max_new_tokens=first.max_new_tokens,
            do_sample=first.temperature > 0,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=[eos] if eos is not None else None,
        )
        if first.stop:  # each row stops at its first stop string, not only at EOS
            kwargs.update(stop_strings=list(first.stop), tokenizer=self.tok)
        if first.temperature > 0:
            kwargs.update(temperature=first.temperature, top_p=first.top_p, top_k=0)
            torch.manual_seed(request_seed(*(r.seed for r in reqs), *(r.key for r in reqs)))
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if first.top_logprobs:
            kwargs.update(output_scores=True, return_dict_in_generate=True)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        sequences = out.sequences if first.top_logprobs else out
        new = sequences[:, enc["input_ids"].shape[1] :]
        replies = []
        for row, req in enumerate(reqs):
            ids = new[row].tolist()
            # the tokens this row generated: up to its EOS (kept) or the padding after it
            n = len(ids)
            if eos is not None and eos in ids:
                n = ids.index(eos) + 1
            elif self.tok.pad_token_id is not None:
                while n and ids[n - 1] == self.tok.pad_token_id:
                    n -= 1
            raw = self.tok.decode(ids[:n], skip_special_tokens=True)
            text, stopped = cut_at_stop(raw, req.stop)
            ended = stopped or (eos is not None and eos in ids[:n]) or n < req.max_new_tokens
            replies.append(
                Reply(
                    key=req.key,
                    text=text.strip(),
                    finish_reason="stop" if ended else "length",
                    prompt_tokens=int(enc["attention_mask"][row].sum()),
                    completion_tokens=n,
                    top_logprobs=self._top(out.scores, row, req.top_logprobs) if req.top_logprobs else None,
                )
            )
        return replies

    def _top(self, scores: Sequence[Any], row: int, k: int, positions: int = 1) -> list[dict[str, float]]:
        import torch

        result = []
        for step in scores[:positions]:
            logp = torch.log_softmax(step[row].float(), dim=-1)
            values, ids = logp.topk(k)
            result.append({self.tok.decode([int(i)]): float(v) for v, i in zip(values, ids) if math.isfinite(float(v))})
        return result

    def loglikelihood(self, requests: list[tuple[str, str]], desc: str = "score") -> list[tuple[float, bool]]:
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
            self.usage.prompt_tokens += int(mask.sum())
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
