"""Generation speed: the transformers backend against a per-prompt `transformers.pipeline`
loop, and the openai backend against a local OpenAI-compatible server at concurrency 1 and 8.

    .venv/bin/python bench/gen_speed.py [--model PATH] [--prompts 64] [--api-prompts 16] [--tiny]

Baseline 1: `transformers.pipeline("text-generation")` called once per prompt (greedy,
`max_new_tokens` new tokens, the text after the prompt). Ours: `TransformersBackend` on the
same prompts and settings (length-sorted batches of `--batch-size`, stop at EOS). Both run the
same loaded model (default: the prepared SmolLM2-135M-Instruct, float32 on CPU); the prompts
are the built-in seed instructions in the model's chat template. Target: at least 8x.
Tokens are counted the same way on both sides: the generated text re-tokenized.

Then tests/openai_server.py serves the same model on 127.0.0.1 and the openai backend sends
`--api-prompts` chat requests at concurrency 1 and at 8 (the server batches requests that
arrive together), and the ratio of the two is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.openai_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="Model folder (default: the prepared SmolLM2-135M-Instruct).")
    ap.add_argument("--tiny", action="store_true", help="A tiny random model: a smoke run of the script.")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--api-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    import torch
    from transformers import pipeline

    from polyalign.stages.core.backends import Request, run
    from polyalign.stages.core.backends.openai import OpenAIBackend
    from polyalign.stages.core.backends.transformers import TransformersBackend
    from polyalign.stages.core.loading import load_causal_lm, load_tokenizer
    from polyalign.stages.core.model_specs import ModelSpec, OpenAISpec, TinySpec, models_dir
    from polyalign.stages.core.prepare import ensure_model
    from polyalign.stages.self_instruct import load_seed_tasks

    if args.tiny:
        path = ensure_model(ModelSpec(tiny=TinySpec()), models_dir())
    else:
        path = args.model or ensure_model(ModelSpec(prepared="smollm2-135m-instruct"), models_dir())
    model, tok = load_causal_lm(path), load_tokenizer(path)
    seeds = [s["instruction"] for s in load_seed_tasks("builtin")]
    instructions = [seeds[i % len(seeds)] for i in range(args.prompts)]
    ours = TransformersBackend(model, tok, batch_size=args.batch_size, progress=False)
    texts = [ours.chat_prompt(x) for x in instructions]
    n_tokens = lambda outs: sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)  # noqa: E731
    print(f"model {path}; {args.prompts} prompts, {args.max_new_tokens} new tokens, greedy; torch threads {torch.get_num_threads()}")

    # baseline: one pipeline call per prompt
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device=model.device)
    start = time.perf_counter()
    base_out = []
    for t in texts:
        res = pipe(t, max_new_tokens=args.max_new_tokens, do_sample=False, return_full_text=False, temperature=None, top_p=None, top_k=None)
        base_out.append(res[0]["generated_text"].strip())
    base_s = time.perf_counter() - start
    base_tok = n_tokens(base_out)

    requests = [Request(key=str(i), prompt=t, max_new_tokens=args.max_new_tokens) for i, t in enumerate(texts)]
    start = time.perf_counter()
    replies = run(ours, requests)
    ours_s = time.perf_counter() - start
    ours_out = [replies[r.key].text for r in requests]
    ours_tok = n_tokens(ours_out)
    same = sum(a == b for a, b in zip(base_out, ours_out))

    print("\n| run | seconds | tokens | tokens/s |")
    print("|---|---:|---:|---:|")
    print(f"| baseline: transformers.pipeline, one prompt per call | {base_s:.1f} | {base_tok} | {base_tok / base_s:.1f} |")
    print(f"| polyalign transformers backend (batch {args.batch_size}) | {ours_s:.1f} | {ours_tok} | {ours_tok / ours_s:.1f} |")
    ratio = (ours_tok / ours_s) / (base_tok / base_s)
    print(f"\nspeed-up (tokens/s): {ratio:.1f}x (target >= 8x: {'PASS' if ratio >= 8 else 'MISS'}); identical outputs: {same}/{len(texts)}")

    # the openai backend against a local server, concurrency 1 vs 8
    from tests.openai_server import ModelServer

    server = ModelServer(path, "bench-model", max_batch=8).start()
    try:
        chat = [Request.chat(f"c{i}", x, max_new_tokens=args.max_new_tokens) for i, x in enumerate(instructions[: args.api_prompts])]
        speed = {}
        for conc in (1, 8):
            backend = OpenAIBackend(OpenAISpec(base_url=server.base_url, model="bench-model", concurrency=conc, timeout=600), "bench", progress=False)
            start = time.perf_counter()
            got = run(backend, chat)
            secs = time.perf_counter() - start
            toks = backend.usage.completion_tokens
            speed[conc] = toks / secs
            print(f"openai backend, concurrency {conc}: {secs:.1f} s, {toks} tokens, {toks / secs:.1f} tokens/s ({len(got)} requests)")
        print(f"concurrency 8 vs 1: {speed[8] / speed[1]:.1f}x")
    finally:
        server.stop()
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
