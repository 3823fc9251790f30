"""Training throughput and peak memory of the sft stage vs a plain TRL SFTTrainer script.

Both sides train the same model on the same examples for the same steps, each in a fresh
process (`--rounds N` runs each side N times, alternating which goes first):
- polyalign: the sft stage (`run_stage(pipe, "sft")`) of CONFIG (default the demo), in a
  scratch store holding a copy of the config's self_instruct and translate artifacts (run
  `polyalign run CONFIG --until translate` first). It runs as users run it: its checkpoints
  every `save_steps` count in its time; its batches are padding-free (`sft.padding_free`) and
  its LM head projects only the labelled positions on a CPU too;
- TRL: `SFTTrainer` with an `SFTConfig` that sets only what the stage also sets (steps,
  batch size, gradient accumulation, learning rate and schedule, warmup, max_length, seed,
  completion-only loss, no gradient checkpointing, CPU or bf16 on a GPU), the same LoRA
  (`peft.LoraConfig` from `sft.lora`), the same prompt/completion pairs (built by the stage's
  own `_examples` from the same files) and tokenizer (the stage's loader: its chat template
  for models that ship none, its pad token), no checkpoints; TRL's defaults for the rest, so its
  batches are padded to their longest example and, on a CPU, its LM head projects every position.

Throughput: tokens that are not padding (the Trainer's `num_input_tokens_seen`, counted
the same way on both sides) over `train_runtime` (the Trainer's own clock around the
training loop, model loading excluded). Memory: on CPU the peak resident set (VmHWM) minus
the resident set after the imports, i.e. model, optimizer state, activations and what the
allocator keeps; with CUDA, `torch.cuda.max_memory_allocated`. Target: at least 1.3x the
tokens/s at no more memory.

    .venv/bin/python bench/sft_speed.py [--config configs/demo.yaml] [--steps 8] [--rounds 2]
        [--set FIELD=VALUE ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _memory(after_imports: int) -> dict[str, int]:
    import torch

    if torch.cuda.is_available():
        return {"peak_bytes": int(torch.cuda.max_memory_allocated()), "absolute_peak_bytes": int(torch.cuda.max_memory_allocated())}
    return {"peak_bytes": _rss("VmHWM") - after_imports, "absolute_peak_bytes": _rss("VmHWM")}


def _role_polyalign(config: str, sets: list[str], store: str) -> dict:
    import torch  # noqa: F401  imports first, as on the TRL side
    import trl  # noqa: F401

    from polyalign.stages.core.pipeline import load_pipeline
    from polyalign.stages.core.runner import run_stage

    base = _rss("VmRSS")
    pipe = load_pipeline(config, sets, store=store)
    art, _ = run_stage(pipe, "sft")
    log = art.read_json("train_log.json")
    runtime = next(h["train_runtime"] for h in reversed(log) if "train_runtime" in h)
    m = art.metrics
    return {"tokens": m["tokens"], "seconds": runtime, "steps": m["global_step"], "padding_free": m.get("padding_free"),
            "loss": m["train_loss"], **_memory(base)}


def _role_trl(config: str, sets: list[str], store: str) -> dict:
    import torch
    import trl  # noqa: F401

    base = _rss("VmRSS")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from polyalign.stages import sft
    from polyalign.stages.core.loading import load_tokenizer
    from polyalign.stages.core.pipeline import load_pipeline
    from polyalign.stages.core.runner import stage_inputs

    pipe = load_pipeline(config, sets, store=store)
    cfg = pipe.nodes["sft"].config
    inputs = stage_inputs(pipe, "sft")
    art = inputs["data"]
    paths = [str(art.file(rel)) for rel in sft.training_files(cfg, art)]
    work = Path(tempfile.mkdtemp(prefix="trl-sft-"))
    data = Dataset.from_generator(sft._examples, gen_kwargs={"paths": paths}, cache_dir=str(work / "cache"))
    path = inputs.model(cfg.model)
    tok = load_tokenizer(path, padding_side="right")  # the stage's tokenizer: the same chat template and pad token
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    t, lo = cfg.train, cfg.lora
    args = SFTConfig(
        output_dir=str(work / "out"), max_steps=t.max_steps, num_train_epochs=t.num_epochs,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup if t.warmup < 1 else int(t.warmup), weight_decay=t.weight_decay, seed=t.seed,
        data_seed=t.seed, max_length=t.max_length, completion_only_loss=True, gradient_checkpointing=False,
        use_cpu=not on_gpu, bf16=on_gpu, save_strategy="no", report_to=[], logging_steps=cfg.logging_steps,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config)
    result = trainer.train()
    out = {"tokens": int(trainer.state.num_input_tokens_seen), "seconds": result.metrics["train_runtime"],
           "steps": trainer.state.global_step, "padding_free": False, "loss": result.training_loss, **_memory(base)}
    shutil.rmtree(work, ignore_errors=True)
    return out


def _scratch_store(config: str, sets: list[str], root: Path) -> str:
    """A store with a copy of the config's self_instruct and translate artifacts."""
    from polyalign.stages.core.pipeline import load_pipeline

    pipe = load_pipeline(config, sets)
    fps = pipe.fingerprints()
    store = root / "store"
    for stage in ("self_instruct", "translate"):
        if pipe.store.state(stage, fps[stage]) != "cached":
            sys.exit(f"bench: {stage} of {config} is not in its store ({pipe.store.root}); "
                     f"run `polyalign run {config} --until translate` first")
        src = Path(str(pipe.store.open(stage, fps[stage]).path))
        shutil.copytree(src, store / stage / fps[stage])
    return str(store)


def _spawn(role: str, config: str, sets: list[str], store: str) -> dict:
    sft_dir = Path(store) / "sft"
    shutil.rmtree(sft_dir, ignore_errors=True)  # nothing cached between rounds
    cmd = [sys.executable, __file__, "--role", role, "--config", config, "--store", store]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"bench: the {role} side failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--json")
    ap.add_argument("--role", choices=["polyalign", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sets = [f"sft.train.max_steps={a.steps}", *a.sets]
    if a.role:
        result = (_role_polyalign if a.role == "polyalign" else _role_trl)(a.config, sets, a.store)
        print(json.dumps(result))
        return
    runs: dict[str, list[dict]] = {"trl": [], "polyalign": []}
    with tempfile.TemporaryDirectory(prefix="sft-speed-") as tmp:
        store = _scratch_store(a.config, sets, Path(tmp))
        for k in range(a.rounds):
            for role in (("trl", "polyalign") if k % 2 == 0 else ("polyalign", "trl")):
                r = _spawn(role, a.config, sets, store)
                runs[role].append(r)
                print(f"round {k + 1} {role:9s}: {r['tokens']} tokens in {r['seconds']:.1f} s = "
                      f"{r['tokens'] / r['seconds']:.1f} tokens/s, peak {r['peak_bytes'] / 2**20:.0f} MiB "
                      f"(absolute {r['absolute_peak_bytes'] / 2**20:.0f}), loss {r['loss']:.4f}", flush=True)
    summary = {}
    for role, rs in runs.items():
        summary[role] = {
            "tokens_per_second": statistics.median(r["tokens"] / r["seconds"] for r in rs),
            "peak_bytes": max(r["peak_bytes"] for r in rs),
            "tokens": rs[0]["tokens"], "steps": rs[0]["steps"],
        }
    speed = summary["polyalign"]["tokens_per_second"] / summary["trl"]["tokens_per_second"]
    memory = summary["polyalign"]["peak_bytes"] / summary["trl"]["peak_bytes"]
    ok = speed >= 1.3 and memory <= 1.0
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\nsft_speed on {device}, {Path(a.config).name}, {a.steps} steps, {a.rounds} rounds (median tokens/s, max peak)")
    print("| side | tokens/s | peak memory (MiB) |\n|---|---:|---:|")
    for role in ("trl", "polyalign"):
        s = summary[role]
        print(f"| {'TRL SFTTrainer' if role == 'trl' else 'polyalign sft'} | {s['tokens_per_second']:.1f} | {s['peak_bytes'] / 2**20:.0f} |")
    print(f"ratio: {speed:.2f}x tokens/s, {memory:.2f}x memory -> {'PASS' if ok else 'MISS'} (target >= 1.3x at <= 1.0x)")
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "summary": summary, "speed_ratio": speed,
                                            "memory_ratio": memory, "device": device}, indent=2))


if __name__ == "__main__":
    main()
