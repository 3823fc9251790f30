"""Reward model: TRL's RewardTrainer (Bradley-Terry loss) with LoRA on the preference pairs.

The reward model starts from the SFT model (base + SFT adapter merged) with a new scalar
head, and trains a LoRA adapter on it, or (`trainable_layers`, as Okapi did with its last 12
layers) the top decoder layers and the head, saved as a full model. Pairs are split
deterministically by id into train and held-out; the held-out pairwise accuracy (reward of
chosen > reward of rejected), overall and per language, is the stage's headline metric.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from polyalign.stages.core.adapters import sft_model
from polyalign.stages.core.contract import ArtifactWriter, Inputs
from polyalign.stages.core.config import StageConfig, model_field, runtime_field
from polyalign.stages.core.training import PeftSettings, TrainSettings

VERSION = "4"  # 4: the score head is initialised from the training seed
OUTPUTS = ("metrics.json", "model/adapter_config.json|model/config.json")  # in every artifact of this stage
INPUTS = {"pairs": "chosen/rejected pairs (preferences)", "policy": "the SFT adapter (sft)"}


class Config(StageConfig):
    model: str = model_field("Base model (name in `models:`) the SFT adapter belongs to.")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="Share of pairs held out for accuracy.")
    lora: PeftSettings = Field(default_factory=PeftSettings, description="Adapter settings.")
    trainable_layers: int | None = Field(
        None, gt=0, description="Train the last N decoder layers and the score head instead of an adapter "
        "(Okapi: 12); the artifact is then a full model and `lora` is not used.")
    train: TrainSettings = Field(
        default_factory=lambda: TrainSettings(learning_rate=5e-5), description="Optimisation settings."
    )
    save_steps: int = runtime_field(50, "Write a resumable checkpoint every this many steps.", gt=0)
    logging_steps: int = runtime_field(10, "Log the loss every this many steps.", gt=0)
    batch_size: int = runtime_field(8, "Pairs per batch when scoring held-out pairs.", gt=0)


def run(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    """The pairs are streamed: one pass splits them into train and held-out files (and
    quarantines those too long) in the work folder, training reads the train file through an
    Arrow table on disk, and the held-out pairs are scored a chunk at a time; the work files
    are removed before the artifact is committed."""
    import itertools
    import json
    import shutil

    from trl import RewardConfig, RewardTrainer

    from polyalign.stages.core.distributed import is_main, rank
    from polyalign.stages.core.io import stable_unit
    from polyalign.stages.core.loading import load_causal_lm, load_reward_model, load_tokenizer
    from polyalign.stages.core.reward import conversation, score
    from polyalign.stages.core.store import iter_jsonl
    from polyalign.stages.core.training import peft_config, streamed_dataset, train_resumable, trainer_kwargs

    art = inputs["pairs"]
    path = inputs.model(cfg.model)
    tok = load_tokenizer(path, padding_side="right")

    # RewardTrainer silently drops pairs longer than max_length: quarantine them ourselves
    def n_tokens(prompt: str, answer: str) -> int:
        text = tok.apply_chat_template(conversation(prompt, answer), tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    work = out.path(f"work/rank{rank()}")
    work.mkdir(parents=True, exist_ok=True)
    counts = {"pairs": 0, "train": 0, "held": 0, "too_long": 0}
    with open(work / "train.jsonl", "w", encoding="utf-8") as train_f, open(work / "held.jsonl", "w", encoding="utf-8") as held_f, \
            open(work / "too_long.jsonl", "w", encoding="utf-8") as long_f:
        for rel in art.listed("data/*/*.jsonl"):
            for _, p in iter_jsonl(art.file(rel)):
                counts["pairs"] += 1
                longest = max(n_tokens(p["prompt"], p["chosen"]), n_tokens(p["prompt"], p["rejected"]))
                if longest > cfg.train.max_length:
                    counts["too_long"] += 1
                    row = {"id": p["id"], "lang": p["lang"], "reason": f"{longest} tokens > max_length {cfg.train.max_length}"}
                    long_f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    continue
                held = stable_unit(p["id"]) < cfg.eval_fraction
                counts["held" if held else "train"] += 1
                (held_f if held else train_f).write(json.dumps(p, ensure_ascii=False) + "\n")
    out.write_jsonl("quarantine.jsonl", (row for _, row in iter_jsonl(work / "too_long.jsonl")))
    if not counts["train"]:
        raise RuntimeError(
            f"reward_model: no training pairs ({counts['pairs']} pairs, {counts['too_long']} too long, "
            f"eval_fraction {cfg.eval_fraction})"
        )
    data = streamed_dataset([str(work / "train.jsonl")], "reward", work / "dataset_cache")
    sft_adapter = sft_model(inputs["policy"], stage="reward_model")
    from transformers import set_seed

    # the score head starts random when the classifier is built: seeded, so that it does not
    # depend on what this process ran before (a resumed run must equal an uninterrupted one)
    set_seed(cfg.train.seed)
    model = load_causal_lm(path, [sft_adapter], inputs.model_dtype(cfg.model), num_labels=1)
    peft = peft_config(cfg.lora, "SEQ_CLS", model, "reward_model.lora.target_modules")
    if cfg.trainable_layers:
        from polyalign.stages.core.errors import UserError
        from polyalign.stages.core.ppo import unfreeze_top_layers

        try:
            unfreeze_top_layers(model, cfg.trainable_layers)
        except ValueError as exc:
            raise UserError(f"reward_model.trainable_layers: {str(exc).split(': ', 1)[1]}") from None
        head = getattr(model, "score", None) or model.classifier
        for p in head.parameters():  # the new head always trains
            p.requires_grad_(True)
        peft = None
    ckpt_dir = out.path("checkpoints")
    args = RewardConfig(**trainer_kwargs(cfg.train, ckpt_dir, cfg.save_steps, cfg.logging_steps), max_length=cfg.train.max_length)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft)

    def save() -> None:
        trainer.model.save_pretrained(str(out.path("model")), safe_serialization=True)
        tok.save_pretrained(str(out.path("model")))

    stats = train_resumable(trainer, ckpt_dir, save, tensorboard="tensorboard" in cfg.train.report_to)
    del trainer, model, data

    accuracy = None
    per_language: dict[str, dict[str, float]] = {}
    if counts["held"] and is_main():
        # score with the saved artifact, loaded the way consumers of the reward model load it
        rm = load_reward_model(path, [sft_adapter, str(out.path("model"))], inputs.model_dtype(cfg.model))
        correct = [0]
        by_lang: dict[str, list[int]] = {}  # language -> [correct, pairs]

        def scored() -> Any:
            rows = (p for _, p in iter_jsonl(work / "held.jsonl"))
            while chunk := list(itertools.islice(rows, 512)):
                conv = [conversation(p["prompt"], p["chosen"]) for p in chunk] + [conversation(p["prompt"], p["rejected"]) for p in chunk]
                rewards = score(rm, tok, conv, cfg.batch_size)
                for p, c, r in zip(chunk, rewards[: len(chunk)], rewards[len(chunk) :]):
                    correct[0] += c > r
                    tally = by_lang.setdefault(p["lang"], [0, 0])
                    tally[0] += c > r
                    tally[1] += 1
                    yield {"id": p["id"], "lang": p["lang"], "reward_chosen": c, "reward_rejected": r}

        out.write_jsonl("heldout_scores.jsonl", scored())
        accuracy = correct[0] / counts["held"]
        per_language = {lang: {"accuracy": ok / n, "pairs": n} for lang, (ok, n) in sorted(by_lang.items())}
    shutil.rmtree(work, ignore_errors=True)
    if is_main():
        shutil.rmtree(work.parent, ignore_errors=True)  # every process's work files
    out.write_json("train_log.json", stats.pop("log_history"))
    out.metrics.update(stats, train_pairs=counts["train"], heldout_pairs=counts["held"], quarantined_too_long=counts["too_long"], heldout_accuracy=accuracy,
                       heldout_accuracy_by_language=per_language,
                       trained=f"last {cfg.trainable_layers} layers and the head" if cfg.trainable_layers else cfg.lora.method)
    acc_text = f"{accuracy:.3f} on {counts['held']} held-out pairs" if accuracy is not None else "not measured (no held-out pairs)"
    if per_language:
        acc_text += " (" + ", ".join(f"{lang} {v['accuracy']:.2f} of {v['pairs']}" for lang, v in per_language.items()) + ")"
    out.summary = (
        f"Reward model trained on {counts['train']} pairs for {stats['global_step']} steps; pairwise accuracy "
        f"{acc_text}; {counts['too_long']} pairs longer than max_length quarantined."
    )
