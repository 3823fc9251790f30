"""Log-likelihood of multiple-choice continuations, encoding each context once.

A 25-shot context is about 2K tokens and each of its 4-5 choices only a few. Scoring every
(context, choice) pair as its own sequence, as lm-evaluation-harness does, encodes the
context once per choice. `ChoiceScorer` runs the context once per document, keeps its keys
and values, and scores every choice from that cache; documents are batched. When every
context starts with the same text (a fixed shot set), that prefix is run once for the whole
benchmark; the documents after it are packed into one sequence per batch, each seeing the
prefix cache and its own tokens through a block mask.

The numbers are those of lm-evaluation-harness's HF backend: the same context/continuation
split (trailing spaces of the context move into the continuation; continuation tokens are
those of `tok(context + continuation)` after `len(tok(context))`), the same left truncation
to the model's maximum length, log-softmax over the full vocabulary. Documents whose
requests do not fit the model, and sliding-window models whose window a context exceeds,
are scored request by request exactly as lm-eval does.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from tqdm.auto import tqdm

from polyalign.stages.core.loading import cache_arg, output_cache


def model_max_length(model: Any, tok: Any) -> int:
    """lm-eval's rule: model config first, then the tokenizer, then 2048."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if value:
            return int(value)
    limit = getattr(tok, "model_max_length", None)
    if limit and limit < 10**12:
        return int(limit)
    return 2048


class ChoiceScorer:
    """Sum of log p(continuation | context) for every choice of every document."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 8,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        progress: bool = True,
        encoding: str = "lm-eval",
    ):
        self.model = model
        self.tok = tokenizer
        self.batch_size = max(1, batch_size)
        self.max_length = max_length or model_max_length(model, tokenizer)
        self.add_special_tokens = add_special_tokens
        self.progress = progress
        self.tokens = 0  # tokens run through the model (for the stage metrics)
        self.stats = {"cached": 0, "prefixed": 0, "per_request": 0}
        window = getattr(model.config, "sliding_window", None)
        types = getattr(model.config, "layer_types", None) or []
        self.window = int(window) if window and (not types or "sliding_attention" in types) else None
        # "lm-eval": continuation tokens = tok(context + continuation) after len(tok(context));
        # "okapi": the Okapi harness (lm-eval 0.3) encodes context and continuation separately
        self.encoding = encoding
        import inspect

        # batching with pads between context and continuation needs explicit positions; a model
        # without them (ALiBi: BLOOM, MPT) runs one document at a time, where none are needed
        self.positional = "position_ids" in inspect.signature(model.forward).parameters and not getattr(model.config, "alibi", False)

    # -- tokenization, as lm-eval's HFLM does it ---------------------------------------
    def _ids(self, text: str) -> list[int]:
        """The tokenizer's own default special tokens (e.g. BOS for Llama and Gemma), unless
        the text already starts with the BOS string: lm-eval's rule."""
        special = self.add_special_tokens
        bos = self.tok.bos_token
        if special and bos and text.startswith(bos):
            special = False
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            prefix = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
            cont = self.tok(continuation, add_special_tokens=False)["input_ids"]
            return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
        if self.encoding == "okapi":
            return self._ids(context), self.tok(continuation, add_special_tokens=False)["input_ids"]
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self._ids(context + continuation)
        ctx = self._ids(context)
        return ctx, whole[len(ctx) :]

    # -- public entry --------------------------------------------------------------------
    def score(self, contexts: list[str], continuations: list[list[str]], prefix: str | None = None, desc: str = "score") -> list[list[float]]:
        """Per document, the log-likelihood of each continuation (same order)."""
        encoded = []
        for ctx, conts in zip(contexts, continuations):
            pairs = [self.encode(ctx, c) for c in conts]
            encoded.append((pairs[0][0], [p[1] for p in pairs]))
        prefix_ids = self._shared_tokens(self._ids(prefix), encoded, contexts, prefix) if prefix else []
        groups: dict[tuple[bool, bool], list[int]] = {}  # (uses the prefix, alone in its batch) -> docs
        full = []
        for i, (ctx_ids, cont_ids) in enumerate(encoded):
            total = len(ctx_ids) + max(len(c) for c in cont_ids)
            if total > self.max_length + 1 or not all(cont_ids):
                full.append(i)
                continue
            shared = bool(prefix_ids) and len(ctx_ids) > len(prefix_ids) and ctx_ids[: len(prefix_ids)] == prefix_ids
            # padded batches put pads between context and continuation: a model without position
            # ids cannot skip them, so its documents run alone (no padding at all); a sliding
            # window counts them, so its batches are kept inside the window (see _batches)
            alone = not self.positional or (self.window is not None and total > self.window)
            groups.setdefault((shared, alone), []).append(i)
        out: list[list[float]] = [[] for _ in encoded]
        bar = tqdm(total=len(encoded), desc=desc, unit="doc", disable=not self.progress, leave=False)
        cache = None
        for (shared, alone), docs in sorted(groups.items()):
            if shared and cache is None:
                cache = self._run_prefix(prefix_ids)
            if shared and self.window is None and self.positional:
                self._packed(encoded, docs, out, bar, prefix_ids, cache)
            else:
                self._cached(encoded, docs, out, bar, prefix_ids if shared else [], cache if shared else None, 1 if alone else self.batch_size)
            self.stats["prefixed" if shared else "cached"] += len(docs)
        self._per_request(encoded, full, out, bar)
        bar.close()
        self.stats["per_request"] += len(full)
        return out

    @staticmethod
    def _shared_tokens(prefix_ids: list[int], encoded: list, contexts: list[str], prefix: str) -> list[int]:
        """The prefix tokens every context that starts with the prefix text really shares.

        Tokenized alone, the prefix's last tokens can differ from the same text inside a
        context (GPT-2-style pre-tokenizers make a trailing "\n\n" one token, but "\n", "\n"
        before "Question"), so keep the common part only."""
        common = len(prefix_ids)
        for (ctx, _), text in zip(encoded, contexts):
            if text.startswith(prefix):
                k, top = 0, min(common, len(ctx) - 1)  # leave every context a token of its own
                while k < top and ctx[k] == prefix_ids[k]:
                    k += 1
                common = k
        return prefix_ids[:common]

    # -- the cached path -----------------------------------------------------------------
    def _run_prefix(self, prefix_ids: list[int]) -> Any:
        import torch

        ids = torch.tensor([prefix_ids], device=self.model.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.tokens += len(prefix_ids)
        return output_cache(out)

    def _cached(self, encoded, docs, out, bar, prefix_ids, prefix_cache, batch_size) -> None:  # noqa: ANN001
        import torch
        from transformers import DynamicCache

        device = self.model.device
        n_prefix = len(prefix_ids)
        docs = sorted(docs, key=lambda i: -len(encoded[i][0]))
        for batch in self._batches(encoded, docs, n_prefix, batch_size):
            suffixes = [encoded[i][0][n_prefix:] for i in batch]
            lengths = torch.tensor([len(s) for s in suffixes])
            width = int(lengths.max())
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), n_prefix + width), dtype=torch.long)
            mask[:, :n_prefix] = 1
            for r, s in enumerate(suffixes):  # right padding: real tokens never see the pads
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, n_prefix : n_prefix + len(s)] = 1
            if prefix_cache is not None:
                cache = _select(prefix_cache, torch.zeros(len(batch), dtype=torch.long, device=device))
            else:
                cache = DynamicCache(config=self.model.config)
            last = lengths - 1
            keep = torch.unique(last)  # logits only where each row's context ends
            # pads only follow the real tokens: under the causal mask no real token sees one, and
            # the default positions (prefix length + index) are right, so no mask is passed and
            # the model keeps its fast causal attention
            with torch.inference_mode():
                res = self.model(input_ids=ids.to(device), use_cache=True, logits_to_keep=keep.to(device), **{cache_arg(self.model): cache})
            self.tokens += int(lengths.sum())
            where = {int(p): k for k, p in enumerate(keep)}
            first = torch.log_softmax(
                torch.stack([res.logits[r, where[int(last[r])]] for r in range(len(batch))]).float(), dim=-1
            ).cpu()
            cache = output_cache(res)
            scores = {}
            rows = []  # (row in batch, doc, choice) for continuations longer than one token
            for r, i in enumerate(batch):
                for c, cont in enumerate(encoded[i][1]):
                    scores[(i, c)] = float(first[r, cont[0]])
                    if len(cont) > 1:
                        rows.append((r, i, c))
            # each row copies its document's cache: bound rows x cache length, not just rows
            chunk = max(1, min(self.batch_size * 4, self.batch_size * 1024 // (n_prefix + width)))
            for cstart in range(0, len(rows), chunk):
                part = rows[cstart : cstart + chunk]
                conts = [encoded[i][1][c] for _, i, c in part]
                cwidth = max(len(x) for x in conts) - 1
                cids = torch.zeros((len(part), cwidth), dtype=torch.long)
                cmask = torch.zeros((len(part), cwidth), dtype=torch.long)
                for k, x in enumerate(conts):
                    cids[k, : len(x) - 1] = torch.tensor(x[:-1])
                    cmask[k, : len(x) - 1] = 1
                src = torch.tensor([r for r, _, _ in part])
                sub = _select(cache, src.to(device))
                amask = torch.cat([mask[src], cmask], dim=1)
                pos = n_prefix + lengths[src][:, None] + torch.arange(cwidth)[None, :]
                # with one document, pads sit only after each continuation, where no real token sees them
                masks = {} if len(batch) == 1 else {"attention_mask": amask.to(device), "position_ids": pos.to(device)}
                with torch.inference_mode():
                    res2 = self.model(input_ids=cids.to(device), use_cache=True, **masks, **{cache_arg(self.model): sub})
                logp = torch.log_softmax(res2.logits.float(), dim=-1).cpu()
                self.tokens += int(cmask.sum())
                for k, (_, i, c) in enumerate(part):
                    target = torch.tensor(conts[k][1:])
                    scores[(i, c)] += float(logp[k, : len(target)].gather(1, target[:, None]).sum())
                del sub, res2
            for i in batch:
                out[i] = [scores[(i, c)] for c in range(len(encoded[i][1]))]
            bar.update(len(batch))

    def _batches(self, encoded, docs, n_prefix: int, batch_size: int):  # noqa: ANN001
        """Consecutive documents (longest first), at most `batch_size`; for a sliding-window
        model also no longer than the window once padded: a continuation sits after the
        batch's widest context, and the window is counted in cache slots, pads included."""
        batch: list[int] = []
        width = longest = 0
        for i in docs:
            ctx, conts = encoded[i]
            w, c = max(width, len(ctx) - n_prefix), max(longest, max(len(x) for x in conts))
            full = len(batch) >= batch_size or (
                self.window is not None and batch and n_prefix + w + c - 1 > self.window
            )
            if full:
                yield batch
                batch, w, c = [], len(ctx) - n_prefix, max(len(x) for x in conts)
            batch.append(i)
            width, longest = w, c
        if batch:
            yield batch

    # -- the shared-prefix path: documents packed after the prefix ----------------------------
    def _packed(self, encoded, docs, out, bar, prefix_ids, prefix_cache) -> None:  # noqa: ANN001
        """Several documents after one prefix cache, in one row: each document's suffix and its
        choices, with a block mask (a suffix sees the prefix and itself; a choice sees the
        prefix, its document's suffix and itself) and the positions each would have alone."""
        import torch

        device = self.model.device
        n_prefix = len(prefix_ids)
        for start in range(0, len(docs), self.batch_size):
            batch = docs[start : start + self.batch_size]
            ids: list[int] = []
            pos: list[int] = []
            owner: list[tuple[int, int]] = []  # (document in batch, choice or -1) of each token
            need: list[tuple[int, int, int, int]] = []  # (token whose logits predict, target, doc, choice)
            for b, i in enumerate(batch):
                ctx, conts = encoded[i]
                suffix = ctx[n_prefix:]
                last = len(ids) + len(suffix) - 1
                ids += suffix
                pos += range(n_prefix, n_prefix + len(suffix))
                owner += [(b, -1)] * len(suffix)
                for c, cont in enumerate(conts):
                    need.append((last, cont[0], i, c))
                    base = len(ids)
                    ids += cont[:-1]
                    pos += range(n_prefix + len(suffix), n_prefix + len(suffix) + len(cont) - 1)
                    owner += [(b, c)] * (len(cont) - 1)
                    need += [(base + j, cont[j + 1], i, c) for j in range(len(cont) - 1)]
            doc_of = torch.tensor([b for b, _ in owner])
            choice_of = torch.tensor([c for _, c in owner])
            index = torch.arange(len(ids))
            visible = (
                (doc_of[:, None] == doc_of[None, :])
                & (index[None, :] <= index[:, None])
                & ((choice_of == -1)[None, :] | (choice_of[:, None] == choice_of[None, :]))
            )
            allowed = torch.cat([torch.ones(len(ids), n_prefix, dtype=torch.bool), visible], dim=1)
            # additive (0 / most negative) rather than boolean: eager attention adds a custom 4D mask
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
            cache = copy.copy(prefix_cache)  # layers rebind their tensors on update: the prefix stays
            cache.layers = [copy.copy(layer) for layer in prefix_cache.layers]
            rows = sorted({p for p, _, _, _ in need})
            where = {p: k for k, p in enumerate(rows)}
            with torch.inference_mode():
                res = self.model(
                    input_ids=torch.tensor([ids], device=device),
                    position_ids=torch.tensor([pos], device=device),
                    attention_mask=mask.to(device),
                    use_cache=True,
                    logits_to_keep=torch.tensor(rows, device=device),
                    **{cache_arg(self.model): cache},
                )
            logp = torch.log_softmax(res.logits[0].float(), dim=-1).cpu()
            self.tokens += len(ids)
            scores: dict[tuple[int, int], float] = {}
            for p, target, i, c in need:
                scores[(i, c)] = scores.get((i, c), 0.0) + float(logp[where[p], target])
            for i in batch:
                out[i] = [scores[(i, c)] for c in range(len(encoded[i][1]))]
            bar.update(len(batch))

    # -- the per-request path (lm-eval's own computation) -----------------------------------
    def _per_request(self, encoded, docs, out, bar) -> None:  # noqa: ANN001
        import torch

        device = self.model.device
        requests = [(i, c) for i in docs for c in range(len(encoded[i][1]))]
        requests.sort(key=lambda ic: -(len(encoded[ic[0]][0]) + len(encoded[ic[0]][1][ic[1]])))
        scores = {}
        for start in range(0, len(requests), self.batch_size):
            part = requests[start : start + self.batch_size]
            seqs, conts = [], []
            for i, c in part:
                cont = encoded[i][1][c]
                seqs.append((encoded[i][0] + cont)[-(self.max_length + 1) :][:-1])
                conts.append(cont)
            width = max(len(s) for s in seqs)
            ids = torch.zeros((len(part), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            self.tokens += sum(len(s) for s in seqs)
            for r, (i, c) in enumerate(part):
                n = len(conts[r])
                rows = logp[r, len(seqs[r]) - n : len(seqs[r])]
                scores[(i, c)] = float(rows.gather(1, torch.tensor(conts[r])[:, None]).sum())
        for i in docs:
            out[i] = [scores[(i, c)] for c in range(len(encoded[i][1]))]
            bar.update(1)


def _select(cache: Any, index: Any) -> Any:
    """A new cache holding the rows `index` of `cache` (the original is left untouched)."""
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        clone = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            clone.keys = layer.keys.index_select(0, index)
            clone.values = layer.values.index_select(0, index)
        new.layers.append(clone)
    return new


def mc_metrics(lls: list[list[float]], docs: list[Any]) -> dict:
    """acc, acc_norm (log-likelihood per character of the choice) and their standard errors."""
    hits, hits_norm, preds = [], [], []
    for scores, doc in zip(lls, docs):
        normed = [s / max(len(c), 1) for s, c in zip(scores, doc.choices)]
        pred = max(range(len(scores)), key=scores.__getitem__)
        pred_norm = max(range(len(normed)), key=normed.__getitem__)
        hits.append(float(pred == doc.gold))
        hits_norm.append(float(pred_norm == doc.gold))
        preds.append({"id": doc.id, "loglikelihoods": scores, "pred": pred, "pred_norm": pred_norm, "gold": doc.gold})
    n = len(hits)
    return {
        "n": n,
        "acc": sum(hits) / n if n else None,
        "acc_stderr": mean_stderr(hits),
        "acc_norm": sum(hits_norm) / n if n else None,
        "acc_norm_stderr": mean_stderr(hits_norm),
        "predictions": preds,
    }


def mean_stderr(xs: list[float]) -> float | None:
    """Standard error of the mean with the n-1 sample deviation (both harnesses' formula);
    None below two documents (JSON has no NaN)."""
    n = len(xs)
    if n < 2:
        return None
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)
