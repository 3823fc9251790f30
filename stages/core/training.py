"""Pieces every training stage shares: PEFT settings, Trainer arguments, checkpoint resume."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from polyalign.stages.core.checked import Checked

Reporter = Literal["tensorboard", "wandb", "mlflow"]
# transformers' schedulers that need no settings beyond warmup and the number of steps
Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                    "inverse_sqrt"]
# larger than the width of any model; a rank beyond the width adds nothing
MAX_RANK = 16384
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class PeftSettings(Checked):
    """Parameter-efficient fine-tuning settings (LoRA and DoRA through peft)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["lora", "dora", "full"] = Field(
        "lora", description="lora; dora (weight-decomposed LoRA); full (every weight, no adapter)."
    )
    r: int = Field(16, gt=0, le=MAX_RANK, description="Rank of the adapter matrices.")
    alpha: int = Field(32, gt=0, le=1_000_000, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters ('all-linear' or a list of names)."
    )

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list adapts nothing; name modules or use 'all-linear'")
            bad = [name for name in value if not _MODULE_NAME.match(name)]
            if bad:
                raise ValueError(f"{bad[0]!r} is not a module name (letters, digits, '_' and '.', e.g. q_proj)")
        return value


class TrainSettings(Checked):
    """Optimisation settings shared by SFT, reward modelling and DPO."""

    model_config = ConfigDict(extra="forbid")
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate.")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 means num_epochs decides.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the data when max_steps is -1.")
    batch_size: int = Field(4, gt=0, description="Sequences per device per step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_length: int = Field(512, gt=0, description="Truncate sequences to this many tokens.")
    warmup: float = Field(
        0.03, ge=0, description="Warmup: a share of the steps if below 1, else a number of steps."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler: Scheduler = Field("cosine", description="Learning-rate schedule after warmup (transformers' schedulers).")
    seed: int = Field(42, description="Seed of data order and adapter init.")
    report_to: list[Reporter] = Field(
        default_factory=lambda: list[Reporter](["tensorboard"]),
        description="Where training curves go: tensorboard (event files in the artifact's tensorboard/ folder), "
        "wandb, mlflow (installed and configured by you); [] for none.",
        json_schema_extra={"polyalign_runtime": True},
    )

    @field_validator("max_steps")
    @classmethod
    def _some_steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 steps trains nothing; a positive number, or -1 to let num_epochs decide")
        return value

    @field_validator("report_to")
    @classmethod
    def _installed(cls, value: list[str]) -> list[str]:
        from importlib import util

        missing = [name for name in value if name != "tensorboard" and util.find_spec(name) is None]
        if missing:
            raise ValueError(f"{missing[0]} is not installed here (pip install {missing[0]}), or leave it out")
        return value


def peft_config(p: PeftSettings, task_type: str, model: Any = None, field: str = "lora.target_modules") -> Any:
    """A peft LoraConfig, or None for full fine-tuning. Given the `model`, named target
    modules it does not have are a one-line error before training."""
    if p.method == "full":
        return None
    from peft import LoraConfig

    if model is not None:
        from polyalign.stages.core.adapters import check_target_modules

        check_target_modules(model, p.target_modules, field)
    return LoraConfig(
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=p.target_modules,
        use_dora=p.method == "dora",
        task_type=task_type,
    )


def trainer_kwargs(t: TrainSettings, output_dir: Path, save_steps: int, logging_steps: int) -> dict[str, Any]:
    """Keyword arguments common to every TRL config class we use."""
    import torch

    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir),
        learning_rate=t.learning_rate,
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        warmup_steps=t.warmup if t.warmup < 1 else int(t.warmup),  # below 1: a ratio
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        seed=t.seed,
        data_seed=t.seed,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        save_only_model=False,
        logging_steps=logging_steps,
        report_to=[name for name in t.report_to if name != "tensorboard"],  # tensorboard: see train_resumable
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest *complete* Trainer checkpoint in `output_dir`, if any.

    The Trainer writes `trainer_state.json` last; a checkpoint folder without it was cut off
    by a crash and is removed so that it can never be resumed from.
    """
    if not output_dir.is_dir():
        return None
    complete = []
    for d in output_dir.glob("checkpoint-*"):
        if not d.is_dir() or not d.name.split("-")[-1].isdigit():
            continue
        try:  # the Trainer writes trainer_state.json last, but not atomically
            json.loads((d / "trainer_state.json").read_text())
            complete.append(d)
        except (OSError, ValueError):
            shutil.rmtree(d, ignore_errors=True)
    if not complete:
        return None
    return str(max(complete, key=lambda d: int(d.name.split("-")[-1])))


DONE = "train_result.json"


def tensorboard_callback(log_dir: Path) -> Any:
    """A Trainer callback writing TensorBoard event files into `log_dir` (kept in the
    artifact, unlike the Trainer's default folder inside the checkpoints)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))


def _progress_callback() -> Any:
    """Reports the Trainer's step out of its max_steps (see core.progress)."""
    from transformers import TrainerCallback

    from polyalign.stages.core.progress import report

    class Progress(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            report(state.global_step, state.max_steps)

    return Progress()


@contextlib.contextmanager
def labelled_positions_only() -> Iterator[None]:
    """Let TRL's fused LM head score only the positions that carry a label on a CPU too.

    TRL (1.x) projects only the labelled positions through the LM head on devices with
    Triton (CUDA, XPU); elsewhere it projects every position, prompt and padding included,
    so that an XLA device sees one tile shape per batch size and does not recompile. A CPU
    compiles nothing, and there the head is most of a training step for a model with a large
    vocabulary (Gemma's 262k words: about two thirds of a training step on the demo). The
    per-token log-probabilities of the labelled positions, so the loss and its gradient, are
    the same; only the positions no loss reads are skipped. Without the hook (another TRL
    version) training is unchanged."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        yield
        return
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def checkpoints_without_tokenizer(trainer: Any) -> None:
    """Checkpoints keep what resuming reads (weights, optimizer, scheduler, RNG, trainer
    state), not the tokenizer: it is the base model's, loaded from there on resume, and saved
    once beside the final model. The Trainer would write it into every checkpoint (Gemma's
    is 33 MB, 0.8 s a save on this project's CI machine)."""
    save = trainer._save

    def _save(output_dir: str | None = None, state_dict: dict | None = None) -> None:
        kept, trainer.processing_class = trainer.processing_class, None
        try:
            save(output_dir, state_dict)
        finally:
            trainer.processing_class = kept

    trainer._save = _save


def train_resumable(trainer: Any, output_dir: Path, save: Any, tensorboard: bool = True) -> dict[str, Any]:
    """Train, resuming from the last checkpoint in `output_dir`, then `save()` the model.

    The saved model and its statistics are marked done (`train_result.json` next to
    `output_dir`) before the checkpoints are removed, so a crash at any point after training
    never trains again, and a crash before it resumes from the newest checkpoint.
    """
    done = output_dir.parent / DONE
    if done.exists():
        print(f"[train] already trained; reusing {done.parent / 'model'}")
        try:
            return json.loads(done.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:
            from polyalign.stages.core.errors import CorruptPartialError

            raise CorruptPartialError(
                f"{done}: the marker of a finished training cannot be read back ({type(exc).__name__}); "
                "delete it and the model/ folder beside it to train again"
            ) from None
    ckpt = last_checkpoint(output_dir)
    resumed_step = int(Path(ckpt).name.split("-")[-1]) if ckpt else 0
    if ckpt:
        print(f"[train] resuming from {ckpt}")
    from polyalign.stages.core import distributed

    if tensorboard and distributed.is_main():
        trainer.add_callback(tensorboard_callback(output_dir.parent / "tensorboard"))
    if distributed.is_main():
        trainer.add_callback(_progress_callback())
    checkpoints_without_tokenizer(trainer)
    with labelled_positions_only():
        result = trainer.train(resume_from_checkpoint=ckpt)
    if distributed.is_main():  # the main process saves; every process computes the statistics
        save()
    state = trainer.state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    stats = {
        "global_step": state.global_step,
        "resumed_from_step": resumed_step,
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "trainable_params": trainable,
        "total_params": total,
        "tokens": int(getattr(state, "num_input_tokens_seen", 0) or 0),
        "log_history": state.log_history,
    }
    if not distributed.is_main():  # the main process marks done and cleans up
        return stats
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps(stats))
    tmp.replace(done)
    shutil.rmtree(output_dir, ignore_errors=True)
    return stats


def user_message(record: dict[str, Any]) -> str:
    """The prompt text of an instruction record (instruction, then input if any)."""
    text = record["instruction"].strip()
    if record.get("input", "").strip():
        text += "\n\n" + record["input"].strip()
    return text


def pair_rows(paths: list[str], kind: str) -> Any:
    """Training examples from preference-pair files, one line at a time (a generator for
    `datasets.Dataset.from_generator`, so the pairs are never all in memory):
    - dpo: prompt, chosen, rejected (conversational);
    - kto: each pair twice, unpaired: the chosen completion labelled True, the rejected False;
    - prompt: the prompt alone (online methods);
    - reward: chosen and rejected whole conversations (reward modelling)."""
    from polyalign.stages.core.store import iter_jsonl

    for path in paths:
        for _, p in iter_jsonl(Path(path)):
            user = [{"role": "user", "content": p["prompt"]}]
            chosen = [{"role": "assistant", "content": p["chosen"]}]
            rejected = [{"role": "assistant", "content": p["rejected"]}]
            if kind == "dpo":
                yield {"prompt": user, "chosen": chosen, "rejected": rejected}
            elif kind == "kto":
                yield {"prompt": user, "completion": chosen, "label": True}
                yield {"prompt": user, "completion": rejected, "label": False}
            elif kind == "prompt":
                yield {"prompt": user}
            else:
                yield {"chosen": user + chosen, "rejected": user + rejected}


def streamed_dataset(paths: list[str], kind: str, cache: Path) -> Any:
    """`pair_rows(paths, kind)` as an Arrow-backed dataset written under `cache` (work space
    of the stage, to be removed before its artifact is committed)."""
    from datasets import Dataset

    return Dataset.from_generator(pair_rows, gen_kwargs={"paths": paths, "kind": kind}, cache_dir=str(cache))
