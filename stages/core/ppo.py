"""Proximal policy optimisation of a language model against a reward, kept in the project.

TRL removed its PPOTrainer; this is the algorithm Okapi ran (through trlx), written out:

- The policy is a causal LM with a trainable LoRA adapter (on top of whatever was merged
  into it before, the SFT adapter in polyalign); the reference policy is the same network
  with that adapter disabled, so there is no second copy of the model. Or, as Okapi did, the
  top N decoder layers are trainable (`unfreeze_top_layers`); the reference then runs the
  same network with a frozen copy of those N layers only.
- A value head (one linear layer) reads the last hidden state at every position: of the
  policy's own backbone, or of a separate critic network (`critic=`, with its own trainable
  parameters) so that value and policy gradients never share weights. It starts as the
  constant mean score of the first batch (zero weights), so that the first advantages are
  centred per response and the first value losses do not pull the shared backbone around.
- Each step samples one response per prompt for `rollouts` prompts (top_k 0, top_p 1,
  temperature 1; generated `chunk` prompts at a time), scores prompt and response with the
  reward function, clips the score to +-`reward_clip` and optionally penalises a response that
  never reached EOS.
- Per-token rewards: minus `kl_coef` times the log-ratio of policy to reference at each
  response token, plus the score at the last one. The coefficient is fixed, or adapted
  towards a target KL (Ziegler et al., 2019: proportional, clipped to +-20%, over a horizon).
- Advantages by GAE (gamma, lambda), whitened over the batch; then `ppo_epochs` passes over
  shuffled minibatches with the clipped policy loss, the clipped value loss (times
  `vf_coef`), and AdamW on the adapter and the value head.
- After each step a checkpoint holds the adapter, the value head, the optimizer, the KL
  controller, every random generator and the position in the prompt stream, so a run killed
  at any point resumes at the step after its last checkpoint and follows the same
  trajectory as a run that was never stopped.

Under `torchrun` / `accelerate launch` each of the W processes samples and scores
`rollouts / W` of a step's prompts; gradients are averaged over the processes before every
optimizer step, advantages are whitened and the KL measured over all rollouts, so the
trajectory is that of one process with W times the batch. The main process writes the
checkpoints; each process keeps its own random generators in them.

`PPOTrainer.train` yields one dict of metrics per step (over all processes).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RewardFn = Callable[[list[str], list[str]], list[float]]  # (prompts, responses) -> scores


@dataclass
class PPOSettings:
    steps: int = 100
    rollouts: int = 16  # prompts sampled per step (Okapi: 128)
    chunk: int = 16  # prompts generated at once (Okapi: 16)
    minibatch: int = 4  # rollouts per gradient step
    ppo_epochs: int = 4
    learning_rate: float = 1e-5
    max_prompt_tokens: int = 512
    max_new_tokens: int = 64
    kl_coef: float = 0.1  # initial coefficient
    kl_target: float | None = 6.0  # None: fixed coefficient
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 1.0
    reward_clip: float = 10.0
    missing_eos_penalty: float | None = None
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    seed: int = 0


def _unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class AdaptiveKL:
    """Ziegler et al.'s controller: the coefficient moves by the relative error of the
    measured KL to the target, clipped to +-20%, scaled by the steps over the horizon."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


def whiten(x: Any, mask: Any, shift_mean: bool = True) -> Any:
    """Zero mean, unit variance over the masked entries (of every process, when several run)."""
    import torch

    sums = torch.stack([(x * mask).sum(), mask.sum()]).double()
    _all_reduce(sums)
    mean = (sums[0] / sums[1]).to(x.dtype)
    sq = ((x - mean) ** 2 * mask).sum().double()
    _all_reduce(sq)
    var = (sq / sums[1]).to(x.dtype)
    out = (x - mean) * (var + 1e-8).rsqrt()
    return out if shift_mean else out + mean


def gae(rewards: Any, values: Any, mask: Any, gamma: float, lam: float) -> tuple[Any, Any]:
    """Advantages and returns over response tokens (`mask` 1 where a token was generated)."""
    import torch

    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0)) * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


def _group() -> tuple[int, int]:
    """(world size, rank) of the process group; (1, 0) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_reduce(t: Any) -> Any:
    """Sum over the processes, in place (a no-op in one process)."""
    import torch.distributed as dist

    if _group()[0] > 1:
        dist.all_reduce(t)
    return t


def _all_gather(t: Any) -> Any:
    """The 1-D tensors of every process, concatenated in rank order."""
    import torch
    import torch.distributed as dist

    world = _group()[0]
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _barrier() -> None:
    import torch.distributed as dist

    if _group()[0] > 1:
        dist.barrier()


def start_process_group() -> None:
    """Join the group of a multi-process launch (torchrun / accelerate launch set WORLD_SIZE):
    NCCL on GPUs, gloo on CPUs. Nothing to do in a single process or when already joined."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def decoder_layers(model: Any) -> Any:
    """The stack of decoder layers (the ModuleList with one entry per hidden layer)."""
    import torch

    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"no list of {n} decoder layers found in {type(model).__name__}")


def unfreeze_top_layers(model: Any, n: int) -> int:
    """Freeze every parameter but those of the last `n` decoder layers (Okapi's
    num_layers_unfrozen); returns the number of trainable parameters."""
    layers = decoder_layers(model)
    if not 0 < n <= len(layers):
        raise ValueError(f"num_layers_unfrozen: {n} is not between 1 and the model's {len(layers)} layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[-n:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class PPOTrainer:
    """PPO of `model` against `reward_fn`. `model` is a peft model whose active adapter is
    trained, or a plain causal LM whose trainable parameters (requires_grad) are trained;
    `critic`, when given, is a separate network (with trainable parameters of its own) whose
    last hidden state the value head reads."""

    def __init__(self, model: Any, tokenizer: Any, prompts: Sequence[str], reward_fn: RewardFn, settings: PPOSettings,
                 checkpoint_dir: str | os.PathLike[str], critic: Any = None):
        import inspect

        import torch

        self.model, self.tok, self.prompts, self.reward_fn, self.s = model, tokenizer, list(prompts), reward_fn, settings
        self.critic = critic
        self.dir = Path(checkpoint_dir)
        # a prompt over max_prompt_tokens loses its beginning, never the turn that asks for
        # the response at its end
        self.tok.truncation_side = "left"
        if not self.prompts:
            raise ValueError("ppo: no prompts")
        self.world, self.rank = _group()
        if settings.rollouts % self.world:
            raise ValueError(f"rollouts: {settings.rollouts} is not a multiple of the {self.world} processes")
        self.adapter = hasattr(model, "peft_config") and hasattr(model, "disable_adapter")
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError("ppo: the policy has no trainable parameters")
        # the reference of a policy without an adapter: the trainable tensors as they start
        self._reference = {} if self.adapter else {n: p.detach().clone() for n, p in self.trainable.items()}
        backbone = critic if critic is not None else model
        hidden = _unwrap(backbone).config.hidden_size
        torch.manual_seed(settings.seed)
        self.value_head = torch.nn.Linear(hidden, 1).to(backbone.device)
        # values start at zero: a random head on hidden states of large norm starts far from the
        # returns, and its loss (through a shared backbone) would move the policy at random
        torch.nn.init.zeros_(self.value_head.bias)
        torch.nn.init.zeros_(self.value_head.weight)
        self.critic_params = {n: p for n, p in critic.named_parameters() if p.requires_grad} if critic is not None else {}
        params = list(self.trainable.values()) + list(self.critic_params.values()) + list(self.value_head.parameters())
        if self.world > 1:  # every process starts from the main one's weights
            import torch.distributed as dist

            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, 0)
            torch.manual_seed(settings.seed + 1_000_003 * self.rank)  # each process samples its own responses
        self.optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
        self.kl = AdaptiveKL(settings.kl_coef, settings.kl_target, settings.kl_horizon)
        self.step = 0
        self.position = 0  # next prompt of the stream
        self.history: list[dict[str, float]] = []
        self.rng = random.Random(settings.seed)  # minibatch order: the same in every process
        self._keeps_logits = "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters
        self._critic_keeps_logits = critic is not None and "logits_to_keep" in inspect.signature(_unwrap(critic).forward).parameters
        self._resume()

    # -- checkpoints --------------------------------------------------------------------------

    def _resume(self) -> None:
        import torch
        from safetensors.torch import load_file

        done = sorted((d for d in self.dir.glob("step-*") if (d / "state.json").exists()), key=lambda d: int(d.name[5:]))
        if self.rank == 0:
            for d in self.dir.glob("step-*"):
                if not (d / "state.json").exists():  # cut off mid-write
                    shutil.rmtree(d, ignore_errors=True)
        if not done:
            return
        last = done[-1]
        device = str(self.value_head.weight.device)
        with torch.no_grad():
            for name, t in load_file(str(last / "trainable.safetensors"), device=str(self.model.device)).items():
                self.trainable[name].copy_(t)
            if self.critic_params:
                for name, t in load_file(str(last / "critic.safetensors"), device=str(self.critic.device)).items():
                    self.critic_params[name].copy_(t)
        self.value_head.load_state_dict(torch.load(last / "value_head.pt", map_location=device))
        self.optimizer.load_state_dict(torch.load(last / "optimizer.pt", map_location=device))
        state = json.loads((last / "state.json").read_text())
        self.step, self.position, self.kl.value, self.history = state["step"], state["position"], state["kl_coef"], state["history"]
        mine = last / f"rng-{self.rank}.pt"
        if not mine.exists():  # resumed with more processes than the run that wrote it
            print(f"[ppo] {mine.name} missing: process {self.rank} reseeds; the run no longer follows the stopped one exactly")
            torch.manual_seed(self.s.seed + 1_000_003 * self.rank + self.step)
            return
        rng = torch.load(mine, weights_only=False)
        self.rng.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng.get("cuda") is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _save(self) -> None:
        import torch
        from safetensors.torch import save_file

        final = self.dir / f"step-{self.step}"
        tmp = self.dir / f".step-{self.step}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        torch.save(
            {"python": self.rng.getstate(), "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            tmp / f"rng-{self.rank}.pt",
        )
        _barrier()
        if self.world > 1:  # the averaged gradients keep every process's weights identical: check
            import torch

            total = torch.stack([p.detach().double().sum() for p in self.trainable.values()]).sum().reshape(1)
            sums = _all_gather(total)
            if not torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-6, atol=1e-8):
                raise RuntimeError(f"ppo: the processes' weights diverged at step {self.step}: {sums.tolist()}")
        if self.rank == 0:
            save_file({k: v.detach().contiguous() for k, v in self.trainable.items()}, str(tmp / "trainable.safetensors"))
            if self.critic_params:
                save_file({k: v.detach().contiguous() for k, v in self.critic_params.items()}, str(tmp / "critic.safetensors"))
            torch.save(self.value_head.state_dict(), tmp / "value_head.pt")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            state = {"step": self.step, "position": self.position, "kl_coef": self.kl.value, "history": self.history,
                     "settings": asdict(self.s), "processes": self.world}
            (tmp / "state.json").write_text(json.dumps(state))  # written last: the checkpoint is complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.dir.glob("step-*"):  # keep the newest only
                if old != final and int(old.name[5:]) < self.step:
                    shutil.rmtree(old, ignore_errors=True)
        _barrier()

    # -- one step -----------------------------------------------------------------------------

    def _next_prompts(self) -> list[str]:
        out = []
        for _ in range(self.s.rollouts):
            out.append(self.prompts[self.position % len(self.prompts)])
            self.position += 1
        return out

    def _forward(self, ids: Any, mask: Any, start: int, with_values: bool, reference: bool = False) -> tuple[Any, Any, Any]:
        """Log-probabilities of tokens start.. given their prefix (of the reference policy with
        `reference`), and (with values) the values at positions start-1.. (the state before
        each response token) and the logits."""
        import torch

        # only the positions that predict a response token go through the output head (with a
        # 262K vocabulary the head over a long prompt costs more than the whole backbone)
        keep = ids.shape[1] - start + 1
        shared = with_values and self.critic is None
        kwargs = dict(input_ids=ids, attention_mask=mask, output_hidden_states=shared, use_cache=False,
                      **({"logits_to_keep": keep} if self._keeps_logits else {}))
        if not reference:
            out = self.model(**kwargs)
        elif self.adapter:
            with self.model.disable_adapter():
                out = self.model(**kwargs)
        else:  # the same network with the trained layers swapped for their starting copy
            out = torch.func.functional_call(self.model, self._reference, args=(), kwargs=kwargs, strict=False)
        logits = out.logits[:, -keep:-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, start:, None]).squeeze(-1)
        values = None
        if with_values:
            if shared:
                hidden = out.hidden_states[-1][:, start - 1 : -1]
            else:
                c = self.critic(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                                **({"logits_to_keep": 1} if self._critic_keeps_logits else {}))
                hidden = c.hidden_states[-1][:, start - 1 : -1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logp, values, logits if with_values else None

    def _rollout(self, prompts: list[str]) -> dict[str, Any]:
        import torch

        tok, model, s = self.tok, self.model, self.s
        eos = tok.eos_token_id
        rows: list[tuple[list[int], list[int], bool]] = []
        model.eval()
        for i in range(0, len(prompts), s.chunk):
            enc = tok(prompts[i : i + s.chunk], return_tensors="pt", padding=True, padding_side="left", truncation=True, max_length=s.max_prompt_tokens, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                gen = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=s.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos)
            width = enc["input_ids"].shape[1]
            for r in range(gen.shape[0]):
                prompt = enc["input_ids"][r][enc["attention_mask"][r].bool()].tolist()
                response = gen[r, width:].tolist()
                ended = eos in response
                response = response[: response.index(eos) + 1] if ended else response
                rows.append((prompt, response, ended))
        # one left-padded batch with every prompt ending at the same column `start`
        start = max(len(p) for p, _, _ in rows)
        T = max(len(r) for _, r, _ in rows) if rows else 0
        T = max(T, 1)
        pad = tok.pad_token_id
        ids = torch.full((len(rows), start + T), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        resp_mask = torch.zeros((len(rows), T))
        for r, (p, resp, _) in enumerate(rows):
            ids[r, start - len(p) : start] = torch.tensor(p)
            attn[r, start - len(p) : start] = 1
            if resp:
                ids[r, start : start + len(resp)] = torch.tensor(resp)
                attn[r, start : start + len(resp)] = 1
                resp_mask[r, : len(resp)] = 1
        responses = [tok.decode(resp, skip_special_tokens=True) for _, resp, _ in rows]
        finished = [e for _, _, e in rows]
        return {"ids": ids.to(model.device), "attn": attn.to(model.device), "mask": resp_mask.to(model.device), "start": start, "responses": responses, "ended": finished}

    def train(self) -> Iterator[dict[str, float]]:
        """Run the remaining steps; yields each step's metrics after its checkpoint."""
        while self.step < self.s.steps:
            metrics = self._one_step()
            self.step += 1
            metrics["step"] = self.step
            self.history.append(metrics)
            self._save()
            yield metrics

    def _one_step(self) -> dict[str, float]:
        import torch

        s = self.s
        prompts = self._next_prompts()[self.rank :: self.world]  # this process's share
        roll = self._rollout(prompts)
        ids, attn, mask, start = roll["ids"], roll["attn"], roll["mask"], roll["start"]
        scores = torch.tensor(self.reward_fn(prompts, roll["responses"]), dtype=torch.float32, device=ids.device)
        scores = scores.clamp(-s.reward_clip, s.reward_clip)
        if s.missing_eos_penalty is not None:
            scores = scores - s.missing_eos_penalty * torch.tensor([0.0 if e else 1.0 for e in roll["ended"]], device=ids.device)
        all_scores = _all_gather(scores)  # every process's, for the metrics
        if self.step == 0:
            # the value head starts at the first batch's mean score (over every process): with a
            # constant value the advantages of a response are centred on that mean, so whitening
            # them over tokens does not favour long responses when scores are all of one sign
            with torch.no_grad():
                self.value_head.bias.fill_(float(all_scores.mean()))
        # the no-grad passes go a minibatch at a time: their peak memory is that of an update
        parts: dict[str, list[Any]] = {"old": [], "values": [], "ref": []}
        with torch.no_grad():
            for b in range(0, len(prompts), s.minibatch):
                rows_b = slice(b, b + s.minibatch)
                logp_b, values_b, _ = self._forward(ids[rows_b], attn[rows_b], start, with_values=True)
                parts["old"].append(logp_b)
                parts["values"].append(values_b)
                parts["ref"].append(self._forward(ids[rows_b], attn[rows_b], start, with_values=False, reference=True)[0])
        old_logp, old_values, ref_logp = (torch.cat(parts[k]) for k in ("old", "values", "ref"))
        kl_tokens = (old_logp - ref_logp) * mask
        rewards = -self.kl.value * kl_tokens
        lengths = mask.sum(1).long()
        last = (lengths - 1).clamp(min=0)
        rows = torch.arange(len(prompts), device=ids.device)
        rewards[rows, last] += scores * (lengths > 0)
        advantages, returns = gae(rewards, old_values * mask, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = whiten(advantages, mask) * mask

        # the network stays in eval mode: dropout would make the recomputed log-probabilities
        # differ from those of the rollout before any update
        keys = ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy")
        sums = torch.zeros(len(keys) + 1, dtype=torch.float64, device=ids.device)  # each statistic, then the count
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        n = len(prompts)
        for _ in range(s.ppo_epochs):
            order = list(range(n))
            self.rng.shuffle(order)
            for b in range(0, n, s.minibatch):
                idx = torch.tensor(order[b : b + s.minibatch], device=ids.device)
                m = mask[idx]
                tokens = m.sum().clamp(min=1)
                logp, values, logits = self._forward(ids[idx], attn[idx], start, with_values=True)
                ratio = torch.exp(logp - old_logp[idx])
                adv = advantages[idx]
                pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - s.cliprange, 1 + s.cliprange))
                policy_loss = (pg * m).sum() / tokens
                v_old = old_values[idx]
                v_clip = v_old + (values - v_old).clamp(-s.cliprange_value, s.cliprange_value)
                ret = returns[idx]
                value_loss = 0.5 * (torch.max((values - ret) ** 2, (v_clip - ret) ** 2) * m).sum() / tokens
                loss = policy_loss + s.vf_coef * value_loss
                self.optimizer.zero_grad()
                loss.backward()
                if self.world > 1:
                    self._average_gradients(params)
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    probs = torch.softmax(logits, dim=-1)
                    entropy = -(probs * torch.log_softmax(logits, dim=-1)).sum(-1)
                    sums += torch.tensor([
                        float(policy_loss), float(value_loss),
                        float((((ratio - 1).abs() > s.cliprange).float() * m).sum() / tokens),
                        float((0.5 * (logp - old_logp[idx]) ** 2 * m).sum() / tokens),
                        float((entropy * m).sum() / tokens), 1.0,
                    ], dtype=torch.float64, device=ids.device)
        # over every process (the scores were gathered above): KL and lengths, the mean of the update statistics
        _all_reduce(sums)
        kl_rows = _all_gather(kl_tokens.sum(1))
        all_lengths = _all_gather(lengths.float())
        tokens_total = _all_reduce(attn.sum().float().reshape(1))
        kl = float(kl_rows.mean())
        coef = self.kl.value
        self.kl.update(kl, len(all_scores))
        count = max(float(sums[-1]), 1.0)
        return {
            "reward_mean": float(all_scores.mean()),
            "reward_std": float(all_scores.std()) if len(all_scores) > 1 else 0.0,
            "kl": kl,
            "kl_coef": coef,
            "response_length": float(all_lengths.mean()),
            "tokens": float(tokens_total[0]),  # prompt and response tokens of the batch
            "generated_tokens": float(all_lengths.sum()),
            **{k: float(sums[i]) / count for i, k in enumerate(keys)},
        }

    def _average_gradients(self, params: list[Any]) -> None:
        """Mean gradient over the processes (one all-reduce of every gradient, flattened)."""
        import torch

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        _all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()
