"""Supervised fine-tuning of the base model on the multilingual instruction data.

TRL's SFTTrainer with a LoRA/DoRA adapter, chat-formatted prompt/completion pairs and loss on
the completion only. Trainer checkpoints live in the partial folder; a rerun resumes from the
newest one. The artifact is the adapter (`model/`), loaded on top of the base model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydantic import Field, field_validator

from polyalign.stages.core.contract import ArtifactWriter, Inputs
from polyalign.stages.core.config import StageConfig, model_field, runtime_field
from polyalign.stages.core.languages import check_languages
from polyalign.stages.core.training import PeftSettings, TrainSettings

VERSION = "2"
OUTPUTS = ("metrics.json", "model/adapter_config.json|model/config.json")  # in every artifact of this stage
INPUTS = {"data": "instruction records in every language (translate)"}


class Config(StageConfig):
    model: str = model_field("Base model (name in `models:`) to fine-tune.")
    languages: list[str] = Field(default_factory=list, description="Train on these languages (empty: all).")
    include_english: bool = Field(True, description="Also train on the English source records.")
    lora: PeftSettings = Field(default_factory=PeftSettings, description="Adapter settings.")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Optimisation settings.")
    save_steps: int = runtime_field(50, "Write a resumable checkpoint every this many steps.", gt=0)
    logging_steps: int = runtime_field(10, "Log the loss every this many steps.", gt=0)

    _langs = field_validator("languages")(lambda cls, v: check_languages(v))


def _train_rows(path: str) -> Iterator[dict]:
    from polyalign.stages.core.store import iter_jsonl

    for _, r in iter_jsonl(Path(path)):
        if r.get("split", "train") == "train":
            yield r


def _examples(paths: list[str]) -> Iterator[dict]:
    """Chat-formatted prompt/completion pairs of the training records in `paths`."""
    from polyalign.stages.core.training import user_message

    for path in paths:
        for r in _train_rows(path):
            yield {
                "prompt": [{"role": "user", "content": user_message(r)}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }


def run(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    import shutil

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from polyalign.stages.core.loading import load_causal_lm, load_tokenizer
    from polyalign.stages.core.training import peft_config, train_resumable, trainer_kwargs

    # only the files of the languages trained on are opened; records are streamed from them
    # into an Arrow table on disk (bounded memory), in the order of the files
    langs = set(cfg.languages) | ({"en"} if cfg.include_english else set())
    art = inputs["data"]
    files = [
        rel for rel in art.listed("data/*/*.jsonl")
        if (not cfg.languages or rel.split("/")[1] in langs) and (cfg.include_english or rel.split("/")[1] != "en")
    ]
    paths = [str(art.file(rel)) for rel in files]  # each checked against its digest
    per_lang: dict[str, int] = {}
    for rel, path in zip(files, paths):
        lang = rel.split("/")[1]
        per_lang[lang] = per_lang.get(lang, 0) + sum(1 for _ in _train_rows(path))
    n_rows = sum(per_lang.values())
    if not n_rows:
        raise RuntimeError("sft: no training records after the language and split filters")
    from polyalign.stages.core.distributed import rank

    cache = out.path(f"dataset_cache/rank{rank()}")  # work space: removed before the artifact is committed
    data = Dataset.from_generator(_examples, gen_kwargs={"paths": paths}, cache_dir=str(cache))
    path = inputs.model(cfg.model)
    tok = load_tokenizer(path, padding_side="right")
    model = load_causal_lm(path, dtype=inputs.model_dtype(cfg.model))
    ckpt_dir = out.path("checkpoints")
    args = SFTConfig(
        **trainer_kwargs(cfg.train, ckpt_dir, cfg.save_steps, cfg.logging_steps),
        max_length=cfg.train.max_length,
        completion_only_loss=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft_config(cfg.lora, "CAUSAL_LM"),
    )
    def save() -> None:
        trainer.model.save_pretrained(str(out.path("model")), safe_serialization=True)
        tok.save_pretrained(str(out.path("model")))

    stats = train_resumable(trainer, ckpt_dir, save, tensorboard="tensorboard" in cfg.train.report_to)
    del trainer, data
    shutil.rmtree(cache.parent, ignore_errors=True)
    log_history = stats.pop("log_history")
    out.write_json("train_log.json", log_history)
    out.metrics.update(stats, examples=n_rows, examples_per_language=per_lang)
    out.summary = (
        f"SFT ({cfg.lora.method}, r={cfg.lora.r}) on {n_rows} examples in {len(per_lang)} languages: "
        f"{stats['global_step']} steps, loss {stats['first_logged_loss']} -> {stats['last_logged_loss']}, "
        f"{stats['trainable_params']:,} trainable parameters."
    )
