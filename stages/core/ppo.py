"""Proximal policy optimisation of a language model against a reward, kept in the project.

TRL removed its PPOTrainer; this is the algorithm Okapi ran (through trlx), written out:

- The policy is a causal LM with a trainable LoRA adapter (on top of whatever was merged
  into it before, the SFT adapter in polyalign). The reference policy is the same network
  with that adapter disabled, so there is no second copy of the model. A value head (one
  linear layer) reads the backbone's last hidden state at every position.
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

`PPOTrainer.train` yields one dict of metrics per step.
"""

from __future__ import annotations

import json
import math
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
    mean = (x * mask).sum() / mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / mask.sum()
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


class PPOTrainer:
    """PPO of `model` (a peft model whose active adapter is trained) against `reward_fn`."""

    def __init__(self, model: Any, tokenizer: Any, prompts: Sequence[str], reward_fn: RewardFn, settings: PPOSettings, checkpoint_dir: str | os.PathLike[str]):
        import torch

        self.model, self.tok, self.prompts, self.reward_fn, self.s = model, tokenizer, list(prompts), reward_fn, settings
        self.dir = Path(checkpoint_dir)
        # a prompt over max_prompt_tokens loses its beginning, never the turn that asks for
        # the response at its end
        self.tok.truncation_side = "left"
        if not self.prompts:
            raise ValueError("ppo: no prompts")
        hidden = model.get_base_model().config.hidden_size
        torch.manual_seed(settings.seed)
        self.value_head = torch.nn.Linear(hidden, 1).to(model.device)
        torch.nn.init.zeros_(self.value_head.bias)
        torch.nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden + 1))
        params = [p for p in model.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
        self.kl = AdaptiveKL(settings.kl_coef, settings.kl_target, settings.kl_horizon)
        self.step = 0
        self.position = 0  # next prompt of the stream
        self.history: list[dict[str, float]] = []
        self.rng = random.Random(settings.seed)
        self._resume()

    # -- checkpoints --------------------------------------------------------------------------

    def _resume(self) -> None:
        import torch

        done = sorted((d for d in self.dir.glob("step-*") if (d / "state.json").exists()), key=lambda d: int(d.name[5:]))
        for d in self.dir.glob("step-*"):
            if not (d / "state.json").exists():  # cut off mid-write
                shutil.rmtree(d, ignore_errors=True)
        if not done:
            return
        last = done[-1]
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(last / "adapter.safetensors"), device=str(self.model.device)))
        self.value_head.load_state_dict(torch.load(last / "value_head.pt", map_location=self.model.device))
        self.optimizer.load_state_dict(torch.load(last / "optimizer.pt", map_location=self.model.device))
        state = json.loads((last / "state.json").read_text())
        self.step, self.position, self.kl.value, self.history = state["step"], state["position"], state["kl_coef"], state["history"]
        rng = torch.load(last / "rng.pt", weights_only=False)
        self.rng.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng.get("cuda") is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _save(self) -> None:
        import torch
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        final = self.dir / f"step-{self.step}"
        tmp = self.dir / f".step-{self.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(self.model).items()}, str(tmp / "adapter.safetensors"))
        torch.save(self.value_head.state_dict(), tmp / "value_head.pt")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(
            {"python": self.rng.getstate(), "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            tmp / "rng.pt",
        )
        state = {"step": self.step, "position": self.position, "kl_coef": self.kl.value, "history": self.history, "settings": asdict(self.s)}
        (tmp / "state.json").write_text(json.dumps(state))  # written last: the checkpoint is complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.dir.glob("step-*"):  # keep the newest only
            if old != final and int(old.name[5:]) < self.step:
                shutil.rmtree(old, ignore_errors=True)

    # -- one step -----------------------------------------------------------------------------

    def _next_prompts(self) -> list[str]:
        out = []
        for _ in range(self.s.rollouts):
            out.append(self.prompts[self.position % len(self.prompts)])
            self.position += 1
        return out

    def _forward(self, ids: Any, mask: Any, start: int, with_values: bool) -> tuple[Any, Any, Any]:
        """Log-probabilities of tokens start.. given their prefix, and (with values) the
        values at positions start-1.. (the state before each response token) and the logits."""
        import torch

        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=with_values)
        logits = out.logits[:, start - 1 : -1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, start:, None]).squeeze(-1)
        values = None
        if with_values:
            hidden = out.hidden_states[-1][:, start - 1 : -1]
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
        prompts = self._next_prompts()
        roll = self._rollout(prompts)
        ids, attn, mask, start = roll["ids"], roll["attn"], roll["mask"], roll["start"]
        scores = torch.tensor(self.reward_fn(prompts, roll["responses"]), dtype=torch.float32, device=ids.device)
        scores = scores.clamp(-s.reward_clip, s.reward_clip)
        if s.missing_eos_penalty is not None:
            scores = scores - s.missing_eos_penalty * torch.tensor([0.0 if e else 1.0 for e in roll["ended"]], device=ids.device)
        with torch.no_grad():
            old_logp, old_values, _ = self._forward(ids, attn, start, with_values=True)
            with self.model.disable_adapter():
                ref_logp, _, _ = self._forward(ids, attn, start, with_values=False)
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
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy")}
        n = len(prompts)
        for _ in range(s.ppo_epochs):
            order = list(range(n))
            self.rng.shuffle(order)
            for b in range(0, n, s.minibatch):
                idx = torch.tensor(order[b : b + s.minibatch], device=ids.device)
                m = mask[idx]
                if m.sum() == 0:
                    continue
                logp, values, logits = self._forward(ids[idx], attn[idx], start, with_values=True)
                ratio = torch.exp(logp - old_logp[idx])
                adv = advantages[idx]
                pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - s.cliprange, 1 + s.cliprange))
                policy_loss = (pg * m).sum() / m.sum()
                v_old = old_values[idx]
                v_clip = v_old + (values - v_old).clamp(-s.cliprange_value, s.cliprange_value)
                ret = returns[idx]
                value_loss = 0.5 * (torch.max((values - ret) ** 2, (v_clip - ret) ** 2) * m).sum() / m.sum()
                loss = policy_loss + s.vf_coef * value_loss
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], s.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    probs = torch.softmax(logits, dim=-1)
                    entropy = -(probs * torch.log_softmax(logits, dim=-1)).sum(-1)
                    stats["policy_loss"].append(float(policy_loss))
                    stats["value_loss"].append(float(value_loss))
                    stats["clip_fraction"].append(float((((ratio - 1).abs() > s.cliprange).float() * m).sum() / m.sum()))
                    stats["approx_kl"].append(float((0.5 * (logp - old_logp[idx]) ** 2 * m).sum() / m.sum()))
                    stats["entropy"].append(float((entropy * m).sum() / m.sum()))
        kl = float(kl_tokens.sum(1).mean())
        coef = self.kl.value
        self.kl.update(kl, n)
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        return {
            "reward_mean": float(scores.mean()),
            "reward_std": float(scores.std()) if n > 1 else 0.0,
            "kl": kl,
            "kl_coef": coef,
            "response_length": float(lengths.float().mean()),
            "tokens": float(attn.sum()),  # prompt and response tokens of the batch
            "generated_tokens": float(lengths.sum()),
            **{k: mean(v) for k, v in stats.items()},
        }
