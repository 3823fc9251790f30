"""Time and peak memory of one PPO step: polyalign's PPOTrainer vs TRL's last PPOTrainer.

TRL dropped PPO from its releases; 1.12.0 is the last one whose wheel ships
`trl/experimental/ppo` (1.13.0 has no PPO trainer). The bench therefore builds its own
virtual environment for it, `.bench/trl-ppo` under the repository root (git ignores `.bench/`):
torch first (the same release as this venv's), then trl==1.12.0 with transformers, tokenizers,
accelerate, peft, datasets and their companions pinned to the versions installed here, so the
two sides differ in the trainer only. A file in that venv records the pins; a rerun with the
same pins installs nothing.

Both sides run the same PPO step on the same inputs, each in a fresh process (ours in this
venv, TRL's in its own):
- the same model folder (default: the project's tiny random Llama, `TinySpec`; `--model PATH`
  for a real one), float32, LoRA (r 16, alpha 32, all linear layers, no dropout) on the
  policy, the reference being the policy with the adapter disabled on both sides (the
  policy-only scope: ours' `num_layers_unfrozen` mode is not benched);
- the same reward: a sequence classifier (`num_labels=1`) on the same backbone with the same
  seeded random score head, reading the last token of prompt + response;
- the same chat prompts, `--rollouts` per step (TRL: `per_device_train_batch_size`, one
  generation chunk each), `--minibatch` rollouts per optimizer step, 4 PPO epochs,
  temperature 1, top_k 0, top_p 1 and exactly `--new-tokens` sampled tokens per response (TRL
  with no stop token never stops early; ours gets `min_new_tokens` on the generation config,
  so EOS cannot end a response), fp32, no gradient checkpointing.
What stays as each trainer is built: TRL's value function is a separate model (a second
classifier on the backbone, trained whole), ours a linear head on the policy's last hidden
state (`--critic separate`: on a second copy of the model with its own adapter, as the align
stage's `ppo.critic: separate` builds it); TRL reads the old log-probabilities from the
generation scores, ours runs a forward pass; ours writes a checkpoint (adapter, value head, optimizer, random states) after every
step, which counts in its time; ours re-tokenises the decoded response for the reward model
through the chat template (the align stage's path), TRL scores the token ids as generated.

Timing: `--warmup` steps (1), then `--steps` steps (5); a step runs from the end of the
previous one (ours: `train()` yielding; TRL: its `on_step_end` callback) and the median is
reported. `--rounds N` runs each side N times, alternating which goes first, and pools the
steps (other processes on the machine make single runs noisy); `--threads N` fixes torch's
thread count on both sides.
Memory: on CPU the peak resident set (VmHWM) minus the resident set after the imports
(torch, transformers, peft and the trainer module imported, no model loaded): model weights
(mapped from the safetensors file, resident once touched), optimizer state, activations and
what the allocator keeps, without the libraries' own footprint, which differs between the
venvs; the absolute peak and the anonymous part alone are printed too. With CUDA:
`torch.cuda.max_memory_allocated`.
Each side also reports where its step time goes (generation, reward model, no-grad forwards,
update forward, backward, optimizer, checkpoint, TRL's two `gc.collect()` calls a step,
the rest), the peak memory reached in each phase and the phase and step that set the peak.

    .venv/bin/python bench/ppo_step.py [--model PATH] [--critic shared|separate] [--rollouts 16]
        [--minibatch 4] [--new-tokens 64] [--steps 5] [--rounds 1] [--threads 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / ".bench" / "trl-ppo"
TRL_RELEASE = "trl==1.12.0"  # the last release with trl.experimental.ppo (1.13.0 removed it)
# installed in the TRL venv at the version this venv has (so only the trainer differs)
MIRRORED = ("transformers", "tokenizers", "safetensors", "huggingface_hub", "accelerate", "peft", "datasets",
            "sentencepiece", "numpy", "psutil")
TIME_TARGET = 1.0  # ours / TRL, at most
MEMORY_TARGET = 1.0
PHASES = ("generate", "reward model", "no-grad forwards", "update: forward", "update: backward", "update: optimizer",
          "checkpoint", "gc.collect", "other")


# ---------------------------------------------------------------------------- shared helpers


def _status_mb(field: str) -> float:
    """One memory figure of this process from /proc/self/status (RssAnon, VmRSS, VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


class Memory:
    """Peak memory above what the process held after its imports. On CPU the resident set:
    its kernel-kept peak (VmHWM) gives the figure; a thread reads it every 5 ms to book the
    highest reading to the phase running at the time. It counts the model weights, which
    transformers maps from the safetensors file (file-backed pages, resident once touched),
    and every allocation; it also counts pages of library code run for the first time, a few
    tens of MB that only matter next to a tiny model. The anonymous part alone (RssAnon:
    activations, optimizer state, trained copies of weights) is kept too. With CUDA: the
    allocator's peak, read at each phase boundary."""

    def __init__(self, threads: int) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.cuda = torch.cuda.is_available()
        self.phase = "loading"
        self.step = 0  # steps finished (Phases counts them)
        self.by_phase: dict[str, float] = {}
        self.top, self.top_at, self.top_anon = float("-inf"), "", 0.0
        self.base_anon, self.base_rss = _status_mb("RssAnon"), _status_mb("VmRSS")
        self._stop = threading.Event()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            threading.Thread(target=self._sample, daemon=True).start()

    def _read(self) -> float:
        if self.cuda:
            import torch

            mb = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            return mb
        self.top_anon = max(self.top_anon, _status_mb("RssAnon") - self.base_anon)
        return _status_mb("VmRSS") - self.base_rss

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.note(self.phase, self._read())

    def note(self, phase: str, mb: float) -> None:
        if mb > self.by_phase.get(phase, float("-inf")):
            self.by_phase[phase] = mb
        if mb > self.top + 0.5:  # where the peak was last raised by more than noise
            self.top_at = f"{phase}, step {self.step + 1}" if phase != "loading" else phase
        self.top = max(self.top, mb)

    def enter(self, phase: str) -> str:
        """Start booking to `phase`; returns the phase it replaces."""
        self.note(self.phase, self._read())
        before, self.phase = self.phase, phase
        return before

    def result(self) -> dict[str, Any]:
        self.enter("other")
        self._stop.set()
        out = {"peak_by_phase_mb": self.by_phase, "peak_at": self.top_at, "peak_rss_mb": _status_mb("VmHWM")}
        if self.cuda:
            return {**out, "peak_mb": self.top, "memory_measure": "CUDA allocated"}
        return {**out, "peak_mb": _status_mb("VmHWM") - self.base_rss, "memory_measure": "RSS above imports",
                "peak_anon_mb": self.top_anon}


class Phases:
    """Seconds per phase of each step; `wrap` times a callable into a phase (and books the
    memory it reaches there); the step's remainder is `other`."""

    def __init__(self, memory: Memory, sync: bool) -> None:
        import torch

        self.memory = memory
        self.now: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self.sync = torch.cuda.synchronize if memory.cuda and sync else (lambda: None)
        memory.enter("other")  # the models are loaded

    def wrap(self, fn: Any, phase: Any) -> Any:
        """`phase`: a name, or a function of the call's arguments returning one."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            name = phase(*args, **kwargs) if callable(phase) else phase
            self.sync()
            before = self.memory.enter(name)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.now[name] = self.now.get(name, 0.0) + time.perf_counter() - t
                self.memory.enter(before)

        return timed

    def close_step(self, total: float) -> None:
        known = {k: v for k, v in self.now.items() if k != "other"}
        self.steps.append({**known, "other": max(0.0, total - sum(known.values()))})
        self.now = {}
        self.memory.step += 1


def _finish(job: dict[str, Any], memory: Memory, times: list[float], phases: Phases, extra: dict[str, Any]) -> None:
    import torch

    warm = job["warmup"]
    result = {
        "step_seconds": times,
        "median_seconds": statistics.median(times[warm:]),
        "device": torch.cuda.get_device_name() if memory.cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "phases": {p: statistics.mean(s.get(p, 0.0) for s in phases.steps[warm:]) for p in PHASES},
        "phases_per_step": phases.steps,
        **memory.result(),
        **extra,
    }
    Path(job["out"]).write_text(json.dumps(result))


def _steps_of(job: dict[str, Any]) -> int:
    return int(job["warmup"] + job["steps"])


# ------------------------------------------------------------------------------ ours (this venv)


def worker_ours(job: dict[str, Any]) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from polyalign.stages.core.loading import load_causal_lm, load_tokenizer
    from polyalign.stages.core.ppo import PPOSettings, PPOTrainer
    from polyalign.stages.core.reward import conversation, score

    memory = Memory(job["threads"])
    path, seed = job["model"], job["seed"]
    tok = load_tokenizer(path)
    rm_tok = load_tokenizer(path, padding_side="right")
    torch.manual_seed(seed)
    rm = load_causal_lm(path, [], "float32", num_labels=1)
    base = load_causal_lm(path, [], "float32")
    base.generation_config.min_new_tokens = job["new_tokens"]  # EOS cannot end a response early
    torch.manual_seed(seed + 1)
    policy = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **job["lora"]))
    critic = None
    if job["critic"] == "separate":  # as the align stage builds it: a second copy with its own adapter
        critic = get_peft_model(load_causal_lm(path, [], "float32"), LoraConfig(task_type="CAUSAL_LM", **job["lora"]),
                                adapter_name="critic")
    text_of = dict(zip(job["chat"], job["prompts"]))

    def reward(batch_prompts: list[str], responses: list[str]) -> list[float]:
        return score(rm, rm_tok, [conversation(text_of[p], r) for p, r in zip(batch_prompts, responses)], job["minibatch"])

    settings = PPOSettings(
        steps=_steps_of(job), rollouts=job["rollouts"], chunk=job["rollouts"], minibatch=job["minibatch"],
        ppo_epochs=job["ppo_epochs"], learning_rate=job["learning_rate"], max_new_tokens=job["new_tokens"],
        kl_coef=job["kl_coef"], kl_target=None, vf_coef=job["vf_coef"], seed=seed,
    )
    phases = Phases(memory, job["sync"])
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as ckpt:
        trainer = PPOTrainer(policy, tok, job["chat"], reward, settings, ckpt, critic=critic)
        trainer._rollout = phases.wrap(trainer._rollout, "generate")  # type: ignore[method-assign]
        trainer.reward_fn = phases.wrap(trainer.reward_fn, "reward model")
        trainer._forward = phases.wrap(  # type: ignore[method-assign]
            trainer._forward, lambda *a, **k: "update: forward" if torch.is_grad_enabled() else "no-grad forwards")
        trainer.optimizer.step = phases.wrap(trainer.optimizer.step, "update: optimizer")  # type: ignore[method-assign]
        trainer._save = phases.wrap(trainer._save, "checkpoint")  # type: ignore[method-assign]
        torch.Tensor.backward = phases.wrap(torch.Tensor.backward, "update: backward")  # type: ignore[method-assign]
        times: list[float] = []
        generated: list[float] = []
        t = time.perf_counter()
        for metrics in trainer.train():
            now = time.perf_counter()
            times.append(now - t)
            phases.close_step(now - t)
            generated.append(metrics["generated_tokens"])
            t = time.perf_counter()
    _finish(job, memory, times, phases, {"generated_tokens": generated})


# ---------------------------------------------------------------------------- TRL (its own venv)


def worker_trl(job: dict[str, Any]) -> None:
    import torch
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    memory = Memory(job["threads"])
    path, seed = job["model"], job["seed"]
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # queries end at the same column; responses follow
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def classifier() -> Any:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        return model

    torch.manual_seed(seed)
    reward_model = classifier()  # the same seeded score head as ours
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    value_model = classifier()
    data = Dataset.from_dict({"input_ids": [tok(c, add_special_tokens=False)["input_ids"] for c in job["chat"]]})
    n = job["rollouts"]
    with tempfile.TemporaryDirectory(prefix="ppo-bench-trl-") as out:
        args = PPOConfig(
            output_dir=out, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10**6,
            bf16=False, fp16=False, gradient_checkpointing=False, seed=seed,
            per_device_train_batch_size=n, gradient_accumulation_steps=1, num_mini_batches=n // job["minibatch"],
            local_rollout_forward_batch_size=n, num_ppo_epochs=job["ppo_epochs"], total_episodes=n * _steps_of(job),
            response_length=job["new_tokens"], stop_token=None, temperature=1.0, num_sample_generations=0,
            learning_rate=job["learning_rate"], kl_coef=job["kl_coef"], vf_coef=job["vf_coef"],
            dataloader_num_workers=0,
        )
        trainer = PPOTrainer(
            args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward_model,
            train_dataset=data, value_model=value_model, peft_config=LoraConfig(task_type="CAUSAL_LM", **job["lora"]),
        )

        phases = Phases(memory, job["sync"])
        generated: list[float] = []
        times: list[float] = []

        def generation(*a: Any, **k: Any) -> Any:
            out = original_generation(*a, **k)
            generated.append(float(out[0].shape[0] * (out[0].shape[1] - a[1].shape[1])))
            return out

        original_generation = ppo_module.batch_generation
        ppo_module.batch_generation = phases.wrap(generation, "generate")
        ppo_module.forward = phases.wrap(
            ppo_module.forward, lambda *a, **k: "update: forward" if torch.is_grad_enabled() else "no-grad forwards")
        ppo_module.get_reward = phases.wrap(
            ppo_module.get_reward, lambda model, *a, **k: "reward model" if model is trainer.reward_model else "no-grad forwards")
        trainer.accelerator.backward = phases.wrap(trainer.accelerator.backward, "update: backward")
        trainer.optimizer.step = phases.wrap(trainer.optimizer.step, "update: optimizer")
        ppo_module.gc = SimpleNamespace(collect=phases.wrap(ppo_module.gc.collect, "gc.collect"))  # twice a step

        class Clock(TrainerCallback):
            last = 0.0

            def on_train_begin(self, *a: Any, **k: Any) -> None:
                self.last = time.perf_counter()

            def on_step_end(self, *a: Any, **k: Any) -> None:
                now = time.perf_counter()
                times.append(now - self.last)
                phases.close_step(now - self.last)
                self.last = now

        trainer.add_callback(Clock())
        trainer.train()
    _finish(job, memory, times, phases, {"generated_tokens": generated, "trl": trl.__version__})


# --------------------------------------------------------------------------------- the runner


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", *MIRRORED):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def ensure_trl_venv() -> Path:
    """The TRL venv with TRL_RELEASE and this venv's versions of the rest; idempotent."""
    versions = _versions()
    torch_pin = f"torch=={versions['torch'].split('+')[0]}"
    pins = [TRL_RELEASE] + [f"{k}=={v}" for k, v in versions.items() if k != "torch"]
    marker = TRL_VENV / "bench-pins.txt"
    python = TRL_VENV / "bin" / "python"
    want = "\n".join([torch_pin, *pins]) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == want:
        return python
    print(f"[ppo_step] building {TRL_VENV.relative_to(ROOT)}: {torch_pin}, then {' '.join(pins)}", flush=True)
    marker.unlink(missing_ok=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    for step in ([torch_pin], [torch_pin, *pins]):  # torch first: the local wheel, never another build
        done = subprocess.run([*pip, *step], check=False, capture_output=True, text=True)
        if done.returncode:
            sys.stdout.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit(f"[ppo_step] pip install {' '.join(step)} failed in {TRL_VENV}")
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], check=True, capture_output=True, text=True).stdout
    strays = [line for line in listed.splitlines() if line.lower().startswith("nvidia-")]
    if strays and "+cpu" in versions["torch"]:
        raise SystemExit(f"[ppo_step] the TRL venv pulled CUDA packages next to a CPU torch: {strays}")
    marker.write_text(want)
    return python


def _model(args: argparse.Namespace) -> str:
    if args.model:
        return str(Path(args.model).expanduser())
    from polyalign.stages.core.model_specs import ModelSpec, TinySpec, models_dir
    from polyalign.stages.core.prepare import ensure_model

    spec = TinySpec(seed=args.seed, hidden_size=args.tiny_hidden, num_layers=args.tiny_layers)
    return ensure_model(ModelSpec(tiny=spec), models_dir())


def _prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "stages" / "data" / "seed_tasks.jsonl").read_text().splitlines() if line.strip()]
    return [r["instruction"] for r in rows[:n]]


def _run_side(side: str, python: str, job: dict[str, Any], work: Path) -> dict[str, Any]:
    job = {**job, "out": str(work / f"{side}.json")}
    job_file = work / f"{side}-job.json"
    job_file.write_text(json.dumps(job))
    print(f"[ppo_step] {side}: {job['warmup']} warm-up + {job['steps']} timed steps", flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if side == "trl":
        env.pop("PYTHONPATH", None)  # nothing of polyalign on TRL's side
    log = work / f"{side}.log"
    with open(log, "w") as f:
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--worker", side, str(job_file)],
                              check=False, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(work))
    if proc.returncode:
        sys.stdout.write(log.read_text()[-6000:])
        raise SystemExit(f"[ppo_step] the {side} worker failed ({proc.returncode})")
    return json.loads((work / f"{side}.json").read_text())


def _merge(job: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's runs as one result: every timed step pooled, the highest memory peak."""
    if len(runs) == 1:
        return runs[0]
    warm = job["warmup"]
    out = dict(runs[0])
    out["step_seconds"] = [t for r in runs for t in r["step_seconds"][warm:]]
    out["median_seconds"] = statistics.median(out["step_seconds"])
    for key in ("peak_mb", "peak_rss_mb", "peak_anon_mb"):
        if key in runs[0]:
            out[key] = max(r[key] for r in runs)
    phases = {p for r in runs for p in r["peak_by_phase_mb"]}
    out["peak_by_phase_mb"] = {p: max(r["peak_by_phase_mb"].get(p, 0.0) for r in runs) for p in phases}
    out["peak_at"] = max(runs, key=lambda r: r["peak_mb"])["peak_at"]
    out["phases"] = {p: statistics.mean(r["phases"][p] for r in runs) for p in PHASES}
    out["generated_tokens"] = [g for r in runs for g in r["generated_tokens"]]
    out["runs"] = runs
    return out


def _verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "MISS"


def report(job: dict[str, Any], ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    t_ratio = ours["median_seconds"] / theirs["median_seconds"]
    m_ratio = ours["peak_mb"] / theirs["peak_mb"]
    measure = ours["memory_measure"]
    print()
    print(f"PPO step on {job['model_name']} ({ours['device']}, {ours['torch_threads']} torch threads): "
          f"{job['rollouts']} rollouts x {job['new_tokens']} new tokens, minibatch {job['minibatch']}, "
          f"{job['ppo_epochs']} PPO epochs; our critic {job['critic']}; median of {job['steps']} steps after "
          f"{job['warmup']} warm-up" + (f", {job['rounds']} runs of each side, alternating" if job["rounds"] > 1 else ""))
    print()
    print(f"| side | s/step | steps (s) | peak {measure} | peak RSS (VmHWM) | generated tokens/step |")
    print("|---|---:|---|---:|---:|---:|")
    for name, r in ((f"TRL {theirs['trl']} PPOTrainer", theirs), (f"polyalign PPOTrainer, {job['critic']} critic", ours)):
        timed = r["step_seconds"] if "runs" in r else r["step_seconds"][job["warmup"]:]
        steps = " ".join(f"{s:.2f}" for s in timed)
        gen = statistics.median(r["generated_tokens"])
        print(f"| {name} | {r['median_seconds']:.3f} | {steps} | {r['peak_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB | {gen:.0f} |")
    print()
    print(f"time ours/TRL {t_ratio:.2f}x (target <= {TIME_TARGET:.1f}x: {_verdict(t_ratio, TIME_TARGET)}); "
          f"memory ours/TRL {m_ratio:.2f}x (target <= {MEMORY_TARGET:.1f}x: {_verdict(m_ratio, MEMORY_TARGET)})")
    print()
    print(f"where a step goes (seconds: mean of the timed steps; MB: peak {measure} reached in the phase, any step):")
    print()
    print("| phase | TRL s | ours s | TRL MB | ours MB |")
    print("|---|---:|---:|---:|---:|")
    mb = lambda r, p: f"{r['peak_by_phase_mb'][p]:.0f}" if p in r["peak_by_phase_mb"] else ""
    for p in ("loading", *PHASES):
        secs = ("", "") if p == "loading" else (f"{theirs['phases'][p]:.3f}", f"{ours['phases'][p]:.3f}")
        print(f"| {p} | {secs[0]} | {secs[1]} | {mb(theirs, p)} | {mb(ours, p)} |")
    print()
    print(f"memory peak reached during: TRL {theirs['peak_at']}; ours {ours['peak_at']}")
    if "peak_anon_mb" in ours:
        print(f"anonymous memory alone (RssAnon above imports, sampled): TRL {theirs['peak_anon_mb']:.0f} MB, "
              f"ours {ours['peak_anon_mb']:.0f} MB")
    load = os.getloadavg()[0]
    print(f"\nload average (1 min) at the end: {load:.2f}")
    return {
        "settings": {k: v for k, v in job.items() if k not in ("chat", "prompts", "out")},
        "ours": ours, "trl": theirs, "time_ratio": t_ratio, "memory_ratio": m_ratio, "memory_measure": measure,
        "time_pass": t_ratio <= TIME_TARGET, "memory_pass": m_ratio <= MEMORY_TARGET, "load_average": load,
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        job = json.loads(Path(sys.argv[3]).read_text())
        {"ours": worker_ours, "trl": worker_trl}[sys.argv[2]](job)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a local model folder (default: the tiny random Llama)")
    ap.add_argument("--tiny-hidden", type=int, default=64, help="hidden size of the tiny model")
    ap.add_argument("--tiny-layers", type=int, default=2, help="layers of the tiny model")
    ap.add_argument("--rollouts", type=int, default=16, help="prompts sampled per step (TRL's batch size)")
    ap.add_argument("--minibatch", type=int, default=4, help="rollouts per optimizer step")
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per response, exactly")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--critic", choices=["shared", "separate"], default="shared",
                    help="ours: the value head on the policy's backbone (align's default) or on a separate critic "
                         "(a second copy of the model with its own LoRA adapter, align's ppo.critic: separate)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on both sides (default: torch's choice)")
    ap.add_argument("--rounds", type=int, default=1, help="run the sides this many times, alternating; the median of each side's runs counts")
    ap.add_argument("--sync", action="store_true", help="on CUDA, synchronize around each timed phase")
    ap.add_argument("--only", choices=["ours", "trl"], help="run one side (prints its numbers only)")
    ap.add_argument("--json", help="write the settings and both results here")
    args = ap.parse_args()
    if args.rollouts % args.minibatch:
        ap.error("--rollouts must be a multiple of --minibatch (TRL splits the batch exactly)")
    sys.path.insert(0, str(ROOT))
    from polyalign.stages.core.loading import load_tokenizer

    model = _model(args)
    tok = load_tokenizer(model)
    prompts = _prompts(args.rollouts)
    if len(prompts) < args.rollouts:
        raise SystemExit(f"only {len(prompts)} seed prompts")
    chat = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    job = {
        "model": model, "model_name": Path(model).name, "seed": args.seed, "prompts": prompts, "chat": chat,
        "rollouts": args.rollouts, "minibatch": args.minibatch, "ppo_epochs": args.ppo_epochs, "new_tokens": args.new_tokens,
        "steps": args.steps, "warmup": args.warmup, "learning_rate": 1e-5, "kl_coef": 0.05, "vf_coef": 0.1,
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}, "sync": args.sync,
        "threads": args.threads, "rounds": args.rounds, "critic": args.critic,
    }
    sides = {"ours": sys.executable}
    if args.only != "ours":
        sides["trl"] = str(ensure_trl_venv())
    if args.only == "trl":
        del sides["ours"]
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="ppo-step-") as tmp:
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]  # alternate who goes first
            for side in order:
                runs[side].append(_run_side(side, sides[side], job, Path(tmp)))
    results = {side: _merge(job, rs) for side, rs in runs.items()}
    if args.only:
        print(json.dumps(results[args.only], indent=1))
        return
    summary = report(job, results["ours"], results["trl"])
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
