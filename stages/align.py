"""Alignment of the SFT model with a new LoRA adapter: DPO (TRL's DPOTrainer) on the
preference pairs, or PPO (stages/core/ppo.py) against the reward model.

The policy is the base model with the SFT adapter merged; the method trains a second adapter
on top, and the reference model is the same network with that adapter disabled (no second
copy in memory). PPO's prompts are those of the preference pairs, or of the instruction
records of a `prompts` input (more and more varied prompts than the pairs'); its reward is the
reward model's score of prompt and response. Checkpoints live in the partial folder and a rerun
resumes from the newest; PPO's resume exactly (the same prompts, samples and updates as a run
never stopped).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from polyalign.stages.core.adapters import sft_model
from polyalign.stages.core.checked import Checked
from polyalign.stages.core.config import StageConfig, model_field, runtime_field
from polyalign.stages.core.contract import ArtifactWriter, Inputs
from polyalign.stages.core.training import PeftSettings, TrainSettings

VERSION = "3"
OUTPUTS = ("metrics.json", "model/adapter_config.json|model/config.json")  # in every artifact of this stage
INPUTS = {"pairs": "chosen/rejected pairs (preferences)", "policy": "the SFT adapter (sft)"}
OPTIONAL_INPUTS = {
    "reward_model": "the reward model PPO optimises against (reward_model)",
    "prompts": "instruction records whose prompts PPO samples, every split and language (translate); default: the pairs' prompts",
}


ONLINE = ("rloo", "grpo")


class OnlineSection(Checked):
    """TRL's online methods (rloo, grpo): completions sampled per prompt, scored by the reward model."""

    model_config = ConfigDict(extra="forbid")
    num_generations: int = Field(4, ge=2, description="Completions per prompt (the group; must divide the batch).")
    max_new_tokens: int = Field(128, gt=0, description="Completion budget.")
    beta: float = Field(0.04, ge=0, description="KL coefficient against the reference (0: none).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")


class PPOSection(Checked):
    """PPO settings; the defaults follow Okapi's released rl_training.py where it sets one."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(100, gt=0, description="PPO steps (each: rollouts, then the updates).")
    rollouts: int = Field(128, gt=0, description="Prompts sampled per step (Okapi: 128).")
    chunk: int = Field(16, gt=0, description="Prompts generated at once (Okapi: 16).")
    minibatch: int = Field(16, gt=0, description="Rollouts per gradient step.")
    ppo_epochs: int = Field(4, gt=0, description="Passes over a step's rollouts (Okapi: 4).")
    learning_rate: float = Field(1e-6, gt=0, description="AdamW learning rate (Okapi: 1e-6).")
    max_prompt_tokens: int = Field(512, gt=0, description="Prompts are cut to this many tokens (Okapi: 512).")
    max_new_tokens: int = Field(256, gt=0, description="Response budget (Okapi: 256).")
    kl_coef: float = Field(0.1, ge=0, description="Initial coefficient of the per-token KL penalty (Okapi: 0.1).")
    kl_target: float | None = Field(6.0, gt=0, description="Adaptive controller's target KL (Okapi: 6); null: fixed coefficient.")
    kl_horizon: int = Field(10000, gt=0, description="Controller horizon in rollouts (Okapi: 10000).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (Okapi: 1).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (Okapi: 0.95).")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip (Okapi: 0.2).")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip (Okapi: 0.2).")
    vf_coef: float = Field(1.0, ge=0, description="Value loss coefficient (Okapi: 1.0).")
    reward_clip: float = Field(10.0, gt=0, description="Scores are clipped to +- this (Okapi: 10).")
    missing_eos_penalty: float | None = Field(None, ge=0, description="Subtracted from the score of a response that never ended.")
    num_layers_unfrozen: int | None = Field(
        None, gt=0, description="Train the top N decoder layers instead of a LoRA adapter (Okapi: 5); the reference "
        "then keeps a frozen copy of those N layers, and the artifact is a full model.")
    critic: Literal["shared", "separate"] = Field(
        "shared", description="shared: the value head reads the policy's own last hidden state; separate: a second "
        "copy of the SFT model with its own LoRA adapter (align.lora's settings) carries the value head.")
    seed: int = Field(0, description="Seed of sampling, shuffling and the value head.")


class Config(StageConfig):
    model: str = model_field("Base model (name in `models:`) the SFT adapter belongs to.")
    method: Literal["dpo", "kto", "ppo", "rloo", "grpo"] = Field(
        "dpo",
        description="dpo, kto: on the preference pairs (TRL; kto takes them unpaired); ppo: against the reward "
        "model (polyalign's own); rloo, grpo: TRL's online methods with the reward model as reward function. "
        "ppo, rloo and grpo need the reward_model input.",
    )
    ppo: PPOSection = Field(default_factory=PPOSection, description="PPO settings (method: ppo).")
    online: OnlineSection = Field(default_factory=OnlineSection, description="rloo and grpo settings.")
    beta: float = Field(0.1, gt=0, description="DPO and KTO temperature: strength of the KL anchor to the reference.")
    loss_type: Literal["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                       "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft"] = Field(
        "sigmoid", description="DPO loss variant (TRL's loss_type): sigmoid is DPO's own; ipo, hinge, robust, ... its variants.")
    lora: PeftSettings = Field(default_factory=PeftSettings, description="Adapter settings.")
    train: TrainSettings = Field(
        default_factory=lambda: TrainSettings(learning_rate=5e-6), description="Optimisation settings."
    )
    save_steps: int = runtime_field(50, "Write a resumable checkpoint every this many steps.", gt=0)
    logging_steps: int = runtime_field(10, "Log the loss every this many steps.", gt=0)


def check_config(cfg: Config, models: dict[str, Any], input_names: set[str]) -> str | None:
    if cfg.method in ("ppo", *ONLINE) and "reward_model" not in input_names:
        return f"inputs: method {cfg.method} needs a reward_model input (the reward model it optimises against)"
    if "prompts" in input_names and cfg.method != "ppo":
        return f"inputs.prompts: only method ppo samples from a prompts input ({cfg.method} uses the pairs' prompts)"
    if cfg.method in ONLINE and (cfg.train.batch_size * cfg.train.gradient_accumulation_steps) % cfg.online.num_generations:
        return (f"online.num_generations: {cfg.online.num_generations} must divide train.batch_size x "
                f"gradient_accumulation_steps ({cfg.train.batch_size * cfg.train.gradient_accumulation_steps})")
    return None


def run(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    if cfg.method == "ppo":
        _run_ppo(cfg, inputs, out)
        return
    import shutil

    from trl import (
        DPOConfig,
        DPOTrainer,
        GRPOConfig,
        GRPOTrainer,
        KTOConfig,
        KTOTrainer,
        RLOOConfig,
        RLOOTrainer,
    )

    from polyalign.stages.core.distributed import rank
    from polyalign.stages.core.loading import load_causal_lm, load_tokenizer
    from polyalign.stages.core.training import (
        peft_config,
        streamed_dataset,
        train_resumable,
        trainer_kwargs,
    )

    art = inputs["pairs"]
    files = [str(art.file(rel)) for rel in art.listed("data/*/*.jsonl")]  # each checked against its digest
    n_pairs = art.count_records("data/*/*.jsonl")
    cache = out.path(f"dataset_cache/rank{rank()}")  # work space, removed before commit
    path = inputs.model(cfg.model)
    tok = load_tokenizer(path, padding_side="left" if cfg.method in ONLINE else "right")
    model = load_causal_lm(path, [sft_model(inputs["policy"], stage="align")], inputs.model_dtype(cfg.model))
    model.train()
    ckpt_dir = out.path("checkpoints")
    common = dict(model=model, processing_class=tok,
                  peft_config=peft_config(cfg.lora, "CAUSAL_LM", model, "align.lora.target_modules"))
    kwargs = trainer_kwargs(cfg.train, ckpt_dir, cfg.save_steps, cfg.logging_steps)
    trainer: Any
    if cfg.method == "dpo":
        args = DPOConfig(**kwargs, max_length=cfg.train.max_length, beta=cfg.beta, loss_type=[cfg.loss_type])
        trainer = DPOTrainer(args=args, train_dataset=streamed_dataset(files, "dpo", cache), **common)
    elif cfg.method == "kto":
        # unpaired: every chosen response is a desirable example, every rejected one not
        args = KTOConfig(**kwargs, max_length=cfg.train.max_length, beta=cfg.beta)
        trainer = KTOTrainer(args=args, train_dataset=streamed_dataset(files, "kto", cache), **common)
    else:
        # one example per pair: a prompt that several pairs share is sampled as often
        data = streamed_dataset(files, "prompt", cache)
        per_batch = cfg.train.batch_size * cfg.train.gradient_accumulation_steps // cfg.online.num_generations
        if len(data) < per_batch:
            from polyalign.stages.core.errors import UserError

            raise UserError(f"align: {cfg.method} samples {per_batch} prompts per step but the pairs have {len(data)}; lower train.batch_size")
        online = dict(num_generations=cfg.online.num_generations, max_completion_length=cfg.online.max_new_tokens,
                      beta=cfg.online.beta, temperature=cfg.online.temperature)
        reward = _reward_function(cfg, inputs, path)
        if cfg.method == "grpo":
            trainer = GRPOTrainer(reward_funcs=[reward], args=GRPOConfig(**kwargs, **online), train_dataset=data, **common)
        else:
            trainer = RLOOTrainer(reward_funcs=[reward], args=RLOOConfig(**kwargs, **online), train_dataset=data, **common)

    def save() -> None:
        trainer.model.save_pretrained(str(out.path("model")), safe_serialization=True)
        tok.save_pretrained(str(out.path("model")))

    stats = train_resumable(trainer, ckpt_dir, save, tensorboard="tensorboard" in cfg.train.report_to)
    del trainer
    shutil.rmtree(cache.parent, ignore_errors=True)
    history = stats.pop("log_history")
    out.write_json("train_log.json", history)
    last: dict[str, Any] = next((h for h in reversed(history) if "rewards/accuracies" in h or "reward" in h), {})
    out.metrics.update(stats, method=cfg.method, pairs=n_pairs, reward_accuracy=last.get("rewards/accuracies"),
                       reward_margin=last.get("rewards/margins"), reward=last.get("reward"))
    what = {"dpo": f"DPO (beta={cfg.beta}, {cfg.loss_type})", "kto": f"KTO (beta={cfg.beta})", "grpo": "GRPO", "rloo": "RLOO"}[cfg.method]
    out.summary = (
        f"{what} on {n_pairs} pairs: {stats['global_step']} steps, loss {stats['first_logged_loss']} -> "
        f"{stats['last_logged_loss']}" + (f", last reward accuracy {last.get('rewards/accuracies')}." if cfg.method == "dpo"
                                          else f", last mean reward {last.get('reward')}." if cfg.method in ONLINE else ".")
    )


def _reward_function(cfg: Config, inputs: Inputs, path: str) -> Any:
    """TRL's reward_funcs callable: the reward model's score of each prompt and completion."""
    from polyalign.stages.core.loading import cached_reward_model, load_tokenizer
    from polyalign.stages.core.reward import score

    sft = sft_model(inputs["policy"], stage="align")
    rm = cached_reward_model(path, [sft, str(inputs["reward_model"].file("model"))], inputs.model_dtype(cfg.model))
    rm_tok = load_tokenizer(path, padding_side="right")

    def reward_model(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return score(rm, rm_tok, [list(p) + list(c) for p, c in zip(prompts, completions)], cfg.train.batch_size)

    return reward_model


def _run_ppo(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    import json

    from polyalign.stages.core.training import DONE

    done = out.path(DONE)
    if not done.exists():
        _train_ppo(cfg, inputs, out, done)
    stats = json.loads(done.read_text())
    out.write_json("train_log.json", stats.pop("history"))
    out.metrics.update(stats)
    out.summary = (
        f"PPO on {stats['prompts']} prompts: {stats['steps']} steps, reward-model score {stats['reward_first']:.3f} -> "
        f"{stats['reward_last']:.3f}, KL {stats['kl_last']:.3f} (coefficient {stats['kl_coef_last']:.4f})."
    )


def _train_ppo(cfg: Config, inputs: Inputs, out: ArtifactWriter, done: Any) -> None:
    """Train (resuming from the newest checkpoint), save the adapter, then write `done`."""
    import json
    import shutil

    import torch
    from peft import get_peft_model

    from polyalign.stages.core.distributed import barrier, is_main, world_size
    from polyalign.stages.core.errors import UserError
    from polyalign.stages.core.loading import (
        cached_reward_model,
        load_causal_lm,
        load_tokenizer,
    )
    from polyalign.stages.core.ppo import (
        PPOSettings,
        PPOTrainer,
        start_process_group,
        unfreeze_top_layers,
    )
    from polyalign.stages.core.reward import conversation, score
    from polyalign.stages.core.training import peft_config

    if cfg.ppo.rollouts % world_size():
        raise UserError(f"align.ppo.rollouts: {cfg.ppo.rollouts} is not a multiple of the {world_size()} processes")
    # one copy of each prompt (a pair's prompt has num_responses - 1 pairs or more), in file order
    if inputs.get("prompts") is not None:
        from polyalign.stages.core.training import user_message

        source = inputs["prompts"]
        prompts = list(dict.fromkeys(user_message(r) for r in source.iter_records("data/*/*.jsonl")))
        if not prompts:
            raise UserError(f"align.inputs.prompts: artifact {source.fingerprint[:12]} has no instruction records")
    else:
        prompts = list(dict.fromkeys(p["prompt"] for p in inputs["pairs"].iter_records("data/*/*.jsonl")))
    path = inputs.model(cfg.model)
    dtype = inputs.model_dtype(cfg.model)
    sft = sft_model(inputs["policy"], stage="align")
    tok = load_tokenizer(path)
    lora = peft_config(cfg.lora, "CAUSAL_LM")
    if lora is None and (not cfg.ppo.num_layers_unfrozen or cfg.ppo.critic == "separate"):
        raise UserError("align.lora.method: ppo trains an adapter (lora or dora) unless ppo.num_layers_unfrozen is set "
                        "(and a separate critic always has one)")
    if lora is not None:
        lora.lora_dropout = 0.0  # PPO compares log-probabilities before and after updates
    start_process_group()
    base = load_causal_lm(path, [sft], dtype)
    torch.manual_seed(cfg.ppo.seed)  # the adapter's random init: a resumed run must match
    if cfg.ppo.num_layers_unfrozen:
        try:
            trainable = unfreeze_top_layers(base, cfg.ppo.num_layers_unfrozen)
        except ValueError as exc:
            raise UserError(f"align.ppo.{exc}") from None
        print(f"[align] training the top {cfg.ppo.num_layers_unfrozen} layers: {trainable:,} parameters")
        policy = base
    else:
        policy = get_peft_model(base, lora)
    critic = None
    if cfg.ppo.critic == "separate":
        critic = get_peft_model(load_causal_lm(path, [sft], dtype), lora, adapter_name="critic")
    rm = cached_reward_model(path, [sft, str(inputs["reward_model"].file("model"))], dtype)
    rm_tok = load_tokenizer(path, padding_side="right")
    chat = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    text_of = dict(zip(chat, prompts))

    def reward(batch_prompts: list[str], responses: list[str]) -> list[float]:
        return score(rm, rm_tok, [conversation(text_of[p], r) for p, r in zip(batch_prompts, responses)], cfg.ppo.minibatch)

    settings = PPOSettings(**cfg.ppo.model_dump(exclude={"num_layers_unfrozen", "critic"}))
    trainer = PPOTrainer(policy, tok, chat, reward, settings, out.path("checkpoints"), critic=critic)
    if trainer.step:
        print(f"[align] resuming PPO after step {trainer.step}")
    board = None
    if "tensorboard" in cfg.train.report_to and is_main():
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(log_dir=str(out.path("tensorboard")))
    from polyalign.stages.core.progress import report

    for m in trainer.train():
        if not is_main():
            continue
        report(m["step"], cfg.ppo.steps)
        print(f"[align] ppo step {m['step']}/{cfg.ppo.steps}: reward {m['reward_mean']:.3f}, kl {m['kl']:.3f}, kl_coef {m['kl_coef']:.4f}")
        if board is not None:
            for key, value in m.items():
                if key != "step":
                    board.add_scalar(f"ppo/{key}", value, int(m["step"]))
            board.flush()
    if board is not None:
        board.close()
    if not is_main():
        barrier()  # until the main process has saved the model and written `done`
        return
    # an adapter, or (top layers trained) the whole model with the SFT adapter merged
    policy.save_pretrained(str(out.path("model")), safe_serialization=True)
    tok.save_pretrained(str(out.path("model")))
    history = trainer.history
    stats = {
        "method": "ppo", "steps": trainer.step, "prompts": len(prompts),
        "reward_first": history[0]["reward_mean"], "reward_last": history[-1]["reward_mean"],
        "kl_last": history[-1]["kl"], "kl_coef_last": history[-1]["kl_coef"],
        "trainable_params": sum(p.numel() for p in trainer.trainable.values()) + sum(p.numel() for p in trainer.critic_params.values()),
        "processes": world_size(), "critic": cfg.ppo.critic,
        "trained": f"top {cfg.ppo.num_layers_unfrozen} layers" if cfg.ppo.num_layers_unfrozen else "adapter",
        "total_params": sum(p.numel() for p in policy.parameters()),
        # for the efficiency report: each batch is trained ppo_epochs times and run forward
        # twice more (old policy, reference); generation runs forward once per new token
        "tokens_trained": int(sum(h["tokens"] for h in history) * cfg.ppo.ppo_epochs),
        "tokens_forward": int(sum(2 * h["tokens"] + h["generated_tokens"] for h in history)),
        "history": history,
    }
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps(stats))
    tmp.replace(done)
    shutil.rmtree(out.path("checkpoints"), ignore_errors=True)
    barrier()
