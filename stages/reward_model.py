"""Reward model: TRL's RewardTrainer (Bradley-Terry loss) with LoRA on the preference pairs.

The reward model starts from the SFT model (base + SFT adapter merged) with a new scalar
head. Pairs are split deterministically by id into train and held-out; the held-out pairwise
accuracy (reward of chosen > reward of rejected) is the stage's headline metric.
"""

from __future__ import annotations

from pydantic import Field

from polyalign.stages.core.contract import ArtifactWriter, Inputs
from polyalign.stages.core.config import StageConfig, model_field, runtime_field
from polyalign.stages.core.training import PeftSettings, TrainSettings

VERSION = "1"
OUTPUTS = ("metrics.json", "model/adapter_config.json|model/config.json")  # in every artifact of this stage
INPUTS = {"pairs": "chosen/rejected pairs (preferences)", "policy": "the SFT adapter (sft)"}


class Config(StageConfig):
    model: str = model_field("Base model (name in `models:`) the SFT adapter belongs to.")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="Share of pairs held out for accuracy.")
    lora: PeftSettings = Field(default_factory=PeftSettings, description="Adapter settings.")
    train: TrainSettings = Field(
        default_factory=lambda: TrainSettings(learning_rate=5e-5), description="Optimisation settings."
    )
    save_steps: int = runtime_field(50, "Write a resumable checkpoint every this many steps.", gt=0)
    logging_steps: int = runtime_field(10, "Log the loss every this many steps.", gt=0)
    batch_size: int = runtime_field(8, "Pairs per batch when scoring held-out pairs.", gt=0)


def run(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from polyalign.stages.core.io import stable_unit
    from polyalign.stages.core.loading import load_causal_lm, load_reward_model, load_tokenizer
    from polyalign.stages.core.reward import conversation, score
    from polyalign.stages.core.training import peft_config, train_resumable, trainer_kwargs

    pairs = sorted(inputs["pairs"].records("data/*/*.jsonl"), key=lambda r: r["id"])
    path = inputs.model(cfg.model)
    tok = load_tokenizer(path, padding_side="right")

    # RewardTrainer silently drops pairs longer than max_length: quarantine them ourselves
    def n_tokens(prompt: str, answer: str) -> int:
        text = tok.apply_chat_template(conversation(prompt, answer), tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    too_long = []
    usable = []
    for p in pairs:
        longest = max(n_tokens(p["prompt"], p["chosen"]), n_tokens(p["prompt"], p["rejected"]))
        if longest > cfg.train.max_length:
            too_long.append({"id": p["id"], "lang": p["lang"], "reason": f"{longest} tokens > max_length {cfg.train.max_length}"})
        else:
            usable.append(p)
    out.write_jsonl("quarantine.jsonl", too_long)
    held = [p for p in usable if stable_unit(p["id"]) < cfg.eval_fraction]
    train = [p for p in usable if stable_unit(p["id"]) >= cfg.eval_fraction]
    if not train:
        raise RuntimeError(
            f"reward_model: no training pairs ({len(pairs)} pairs, {len(too_long)} too long, "
            f"eval_fraction {cfg.eval_fraction})"
        )
    data = Dataset.from_list(
        [{"chosen": conversation(p["prompt"], p["chosen"]), "rejected": conversation(p["prompt"], p["rejected"])} for p in train]
    )
    sft_adapter = str(inputs["policy"].file("model"))
    model = load_causal_lm(path, [sft_adapter], inputs.model_dtype(cfg.model), num_labels=1)
    ckpt_dir = out.path("checkpoints")
    args = RewardConfig(**trainer_kwargs(cfg.train, ckpt_dir, cfg.save_steps, cfg.logging_steps), max_length=cfg.train.max_length)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config(cfg.lora, "SEQ_CLS"))

    def save() -> None:
        trainer.model.save_pretrained(str(out.path("model")), safe_serialization=True)
        tok.save_pretrained(str(out.path("model")))

    stats = train_resumable(trainer, ckpt_dir, save, tensorboard="tensorboard" in cfg.train.report_to)
    del trainer, model

    accuracy = None
    if held:
        # score with the saved artifact, loaded the way consumers of the reward model load it
        rm = load_reward_model(path, [sft_adapter, str(out.path("model"))], inputs.model_dtype(cfg.model))
        conv = [conversation(p["prompt"], p["chosen"]) for p in held] + [conversation(p["prompt"], p["rejected"]) for p in held]
        rewards = score(rm, tok, conv, cfg.batch_size)
        chosen, rejected = rewards[: len(held)], rewards[len(held) :]
        accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(held)
        out.write_jsonl("heldout_scores.jsonl", [{"id": p["id"], "lang": p["lang"], "reward_chosen": c, "reward_rejected": r} for p, c, r in zip(held, chosen, rejected)])
    out.write_json("train_log.json", stats.pop("log_history"))
    out.metrics.update(stats, train_pairs=len(train), heldout_pairs=len(held), quarantined_too_long=len(too_long), heldout_accuracy=accuracy)
    acc_text = f"{accuracy:.3f} on {len(held)} held-out pairs" if accuracy is not None else "not measured (no held-out pairs)"
    out.summary = (
        f"Reward model trained on {len(train)} pairs for {stats['global_step']} steps; pairwise accuracy "
        f"{acc_text}; {len(too_long)} pairs longer than max_length quarantined."
    )
