"""Preference alignment of the SFT model with TRL's DPOTrainer and a new LoRA adapter.

The policy is the base model with the SFT adapter merged; DPO trains a second adapter on top,
and the reference model is the same network with that adapter disabled (no second copy in
memory). Checkpoints live in the partial folder and a rerun resumes from the newest. PPO and
TRL's online methods against the reward model come in a later issue: `method` is the switch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from polyalign.stages.core.contract import ArtifactWriter, Inputs
from polyalign.stages.core.config import StageConfig, model_field, runtime_field
from polyalign.stages.core.training import PeftSettings, TrainSettings

VERSION = "1"
OUTPUTS = ("metrics.json", "model/adapter_config.json|model/config.json")  # in every artifact of this stage
INPUTS = {"pairs": "chosen/rejected pairs (preferences)", "policy": "the SFT adapter (sft)"}


class Config(StageConfig):
    model: str = model_field("Base model (name in `models:`) the SFT adapter belongs to.")
    method: Literal["dpo"] = Field("dpo", description="Alignment algorithm (dpo for now).")
    beta: float = Field(0.1, gt=0, description="DPO temperature: strength of the KL anchor to the reference.")
    loss_type: str = Field("sigmoid", description="DPO loss variant (TRL loss_type, e.g. sigmoid, ipo, hinge).")
    lora: PeftSettings = Field(default_factory=PeftSettings, description="Adapter settings.")
    train: TrainSettings = Field(
        default_factory=lambda: TrainSettings(learning_rate=5e-6), description="Optimisation settings."
    )
    save_steps: int = runtime_field(50, "Write a resumable checkpoint every this many steps.", gt=0)
    logging_steps: int = runtime_field(10, "Log the loss every this many steps.", gt=0)


def run(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from polyalign.stages.core.loading import load_causal_lm, load_tokenizer
    from polyalign.stages.core.training import peft_config, train_resumable, trainer_kwargs

    pairs = sorted(inputs["pairs"].records("data/*/*.jsonl"), key=lambda r: r["id"])
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
            for p in pairs
        ]
    )
    path = inputs.model(cfg.model)
    tok = load_tokenizer(path, padding_side="right")
    model = load_causal_lm(path, [str(inputs["policy"].file("model"))], inputs.model_dtype(cfg.model))
    model.train()
    ckpt_dir = out.path("checkpoints")
    args = DPOConfig(
        **trainer_kwargs(cfg.train, ckpt_dir, cfg.save_steps, cfg.logging_steps),
        max_length=cfg.train.max_length,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config(cfg.lora, "CAUSAL_LM"))
    def save() -> None:
        trainer.model.save_pretrained(str(out.path("model")), safe_serialization=True)
        tok.save_pretrained(str(out.path("model")))

    stats = train_resumable(trainer, ckpt_dir, save)
    history = stats.pop("log_history")
    out.write_json("train_log.json", history)
    last: dict[str, Any] = next((h for h in reversed(history) if "rewards/accuracies" in h), {})
    out.metrics.update(
        stats,
        pairs=len(pairs),
        reward_accuracy=last.get("rewards/accuracies"),
        reward_margin=last.get("rewards/margins"),
    )
    out.summary = (
        f"DPO (beta={cfg.beta}) on {len(pairs)} pairs: {stats['global_step']} steps, loss "
        f"{stats['first_logged_loss']} -> {stats['last_logged_loss']}, last reward accuracy "
        f"{last.get('rewards/accuracies')}."
    )
