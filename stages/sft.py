"""Supervised fine-tuning of the base model on the multilingual instruction data.

TRL's SFTTrainer with chat-formatted prompt/completion pairs and loss on the completion only.
`lora.method` picks how the model is fine-tuned (`core.adapters`: peft adapters, prompt and
prefix tuning, QLoRA, full fine-tuning, LISA from `core.lisa`). Languages are mixed as they
come, or resampled by per-language weights or a temperature (`mix_*`). Trainer checkpoints
live in the partial folder; a rerun resumes from the newest one. The artifact is the adapter
(`model/`, loaded on top of the base model) or, for full and LISA, the whole model. With
`per_language`, the stage fans out: one unit per language trains that language's plugin
(`model/<lang>/`), and `finish` reports their bytes against one merged model.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from polyalign.stages.core.adapters import FULL_METHODS, SftPeftSettings
from polyalign.stages.core.contract import ArtifactWriter, Inputs
from polyalign.stages.core.config import StageConfig, model_field, runtime_field
from polyalign.stages.core.languages import check_languages
from polyalign.stages.core.training import TrainSettings

VERSION = "2"
OUTPUTS = ("metrics.json", "model/adapter_config.json|model/config.json|model/*/adapter_config.json")  # in every artifact of this stage
INPUTS = {"data": "instruction records in every language (translate)"}


class Config(StageConfig):
    model: str = model_field("Base model (name in `models:`) to fine-tune.")
    languages: list[str] = Field(default_factory=list, description="Train on these languages (empty: all).")
    include_english: bool = Field(True, description="Also train on the English source records.")
    lora: SftPeftSettings = Field(default_factory=SftPeftSettings, description="Fine-tuning method and adapter settings.")
    mix_temperature: float = Field(
        1.0, gt=0,
        description="Resample languages with probability proportional to count**(1/T): 1 keeps the data as it is, "
        "larger values move towards uniform (the total number of examples stays the same).",
    )
    mix_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Resample languages by these weights instead (language -> weight, every trained language named).",
    )
    per_language: bool = Field(
        False,
        description="Train one adapter per language (a plugin on the shared base; the languages in `languages`, "
        "plus en with include_english), each on its own records, as fan-out units; evaluate routes each "
        "language to its plugin.",
    )
    train: TrainSettings = Field(default_factory=TrainSettings, description="Optimisation settings.")
    padding_free: bool = runtime_field(
        True,
        "Run each batch as one sequence without padding, its examples kept apart by their positions (TRL's "
        "padding-free collator); the stage checks the model does keep them apart and pads otherwise.",
    )
    save_steps: int = runtime_field(50, "Write a resumable checkpoint every this many steps.", gt=0)
    logging_steps: int = runtime_field(10, "Log the loss every this many steps.", gt=0)

    _langs = field_validator("languages")(lambda cls, v: check_languages(v))

    @model_validator(mode="after")
    def _one_mix(self) -> "Config":
        if self.mix_weights and self.mix_temperature != 1.0:
            raise ValueError("mix_weights: give either mix_weights or mix_temperature, not both")
        bad = [k for k, w in self.mix_weights.items() if not (w >= 0 and math.isfinite(w))]
        if bad:
            raise ValueError(f"mix_weights.{bad[0]}: a weight is a finite number >= 0")
        if self.mix_weights and not any(self.mix_weights.values()):
            raise ValueError("mix_weights: at least one weight must be above 0")
        if self.per_language:
            if not self.languages:
                raise ValueError("per_language: name the languages that get a plugin in sft.languages")
            if self.lora.method in FULL_METHODS:
                raise ValueError(f"per_language: a plugin is an adapter; {self.lora.method} trains a whole model")
            if self.mix_weights or self.mix_temperature != 1.0:
                raise ValueError("per_language: each plugin trains on one language; there is no mix to set")
        return self


def _train_rows(path: str) -> Iterator[dict]:
    from polyalign.stages.core.store import iter_jsonl

    for _, r in iter_jsonl(Path(path)):
        if r.get("split", "train") == "train":
            yield r


def training_files(cfg: Config, art: Any) -> list[str]:
    """The data files (relative to the translate artifact) of the languages trained on."""
    langs = set(cfg.languages) | ({"en"} if cfg.include_english else set())
    return [
        rel for rel in art.listed("data/*/*.jsonl")
        if (not cfg.languages or rel.split("/")[1] in langs) and (cfg.include_english or rel.split("/")[1] != "en")
    ]


def mix_counts(counts: dict[str, int], weights: dict[str, float] | None, temperature: float) -> dict[str, int]:
    """Examples per language after resampling: the same total, shared out in proportion to
    `weights`, or else to count**(1/temperature) (largest remainders get the rounding)."""
    total = sum(counts.values())
    raw = {lang: (weights[lang] if weights else n ** (1.0 / temperature)) for lang, n in counts.items()}
    norm = sum(raw.values())
    exact = {lang: total * v / norm for lang, v in raw.items()}
    out = {lang: int(x) for lang, x in exact.items()}
    for lang in sorted(exact, key=lambda k: (out[k] - exact[k], k))[: total - sum(out.values())]:
        out[lang] += 1
    return out


def _picks(n: int, want: int, seed: str) -> list[int]:
    """`want` row numbers out of `n`: whole passes over every row, then a seeded sample."""
    rng = random.Random(seed)
    picks = list(range(n)) * (want // n) + rng.sample(range(n), want % n)
    return sorted(picks)


def _examples(paths: list[str], picks: list[list[int]] | None = None) -> Iterator[dict]:
    """Chat-formatted prompt/completion pairs of the training records in `paths` (each file's
    rows `picks[i]`, repeats included, when given)."""
    from polyalign.stages.core.training import user_message

    for i, path in enumerate(paths):
        rows = _train_rows(path)
        if picks is not None:
            wanted = picks[i]
            kept = list(_train_rows(path)) if wanted else []
            rows = (kept[k] for k in wanted)
        for r in rows:
            yield {
                "prompt": [{"role": "user", "content": user_message(r)}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }


def units(cfg: Config) -> list[str]:
    """One unit per language plugin (none: one model for every language, trained in finish)."""
    if not cfg.per_language:
        return []
    return list(dict.fromkeys(cfg.languages + (["en"] if cfg.include_english else [])))


_ONE_AT_A_TIME = threading.Lock()  # unit tasks run on threads: plugins train one after another


def run_unit(cfg: Config, inputs: Inputs, out: ArtifactWriter, lang: str) -> None:
    files = [rel for rel in training_files(cfg, inputs["data"]) if rel.split("/")[1] == lang]
    with _ONE_AT_A_TIME:
        result = _train(cfg, inputs, out, files, work=f"units/{lang}/", model_dir=f"model/{lang}", save_tokenizer=False)
    out.write_json(f"units/{lang}/result.json", result)


def finish(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    if cfg.per_language:
        _finish_plugins(cfg, inputs, out)
        return
    result = _train(cfg, inputs, out, training_files(cfg, inputs["data"]), work="", model_dir="model", save_tokenizer=True)
    available = result.pop("available_per_language")
    effective = result["examples_per_language"]
    out.metrics.update(result)
    out.card = _card(cfg, available, effective)
    out.summary = (
        f"SFT ({result['method']}) on {result['examples']} examples in {len(effective)} languages: "
        f"{result['global_step']} steps, loss {result['first_logged_loss']} -> {result['last_logged_loss']}, "
        f"{result['trainable_params']:,} trainable parameters."
    )


def _finish_plugins(cfg: Config, inputs: Inputs, out: ArtifactWriter) -> None:
    """Metrics of every plugin, their bytes against one merged model, the shared tokenizer."""
    from polyalign.stages.core.loading import load_tokenizer, torch_dtype

    langs = units(cfg)
    per = {lang: out.read_json(f"units/{lang}/result.json") for lang in langs}
    load_tokenizer(inputs.model(cfg.model), padding_side="right").save_pretrained(str(out.path("model")))
    sizes = {lang: sum(f.stat().st_size for f in out.path(f"model/{lang}").rglob("*") if f.is_file()) for lang in langs}
    first = per[langs[0]]
    base_params = first["total_params"] - first["trainable_params"]
    element = torch_dtype(inputs.model_dtype(cfg.model)).itemsize  # the dtype the plugins were trained in
    merged = base_params * element  # one model with a plugin merged in: the base's weights
    keep = ("global_step", "first_logged_loss", "last_logged_loss", "trainable_params", "tokens", "examples", "padding_free")
    out.metrics.update(
        method=cfg.lora.method,
        plugins={lang: {**{k: per[lang].get(k) for k in keep}, "bytes": sizes[lang]} for lang in langs},
        examples=sum(per[lang]["examples"] for lang in langs),
        examples_per_language={lang: per[lang]["examples"] for lang in langs},
        trainable_params=sum(per[lang]["trainable_params"] for lang in langs),
        total_params=base_params + sum(per[lang]["trainable_params"] for lang in langs),
        global_step=sum(per[lang]["global_step"] for lang in langs),
        tokens=sum(int(per[lang].get("tokens", 0)) for lang in langs),
        plugin_bytes_total=sum(sizes.values()),
        merged_model_bytes=merged,
        merged_models_bytes_total=merged * len(langs),
    )
    human = ", ".join(f"{lang} {sizes[lang] / 2**20:.1f} MiB" for lang in langs)
    out.summary = (
        f"SFT ({cfg.lora.method}) plugins for {len(langs)} languages on one base: {human}; all together "
        f"{sum(sizes.values()) / 2**20:.1f} MiB against {merged / 2**20:.1f} MiB for one merged model "
        f"({merged * len(langs) / 2**20:.1f} MiB for one per language)."
    )


def _train(cfg: Config, inputs: Inputs, out: ArtifactWriter, files: list[str], work: str, model_dir: str,
           save_tokenizer: bool) -> dict[str, Any]:
    """Fine-tune on the records of `files` (relative to the data artifact) into `model_dir`;
    work folders under `work`. Returns the statistics."""
    import shutil

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from polyalign.stages.core import adapters
    from polyalign.stages.core.errors import UserError
    from polyalign.stages.core.loading import LOADING, load_causal_lm, load_tokenizer, torch_dtype
    from polyalign.stages.core.model_specs import load_kwargs
    from polyalign.stages.core.training import train_resumable, trainer_kwargs

    # only the files of the languages trained on are opened; records are streamed from them
    # into an Arrow table on disk (bounded memory), in the order of the files
    art = inputs["data"]
    paths = [str(art.file(rel)) for rel in files]  # each checked against its digest
    per_file = [sum(1 for _ in _train_rows(p)) for p in paths]
    per_lang: dict[str, int] = {}
    for rel, n in zip(files, per_file):
        per_lang[rel.split("/")[1]] = per_lang.get(rel.split("/")[1], 0) + n
    per_lang = {k: v for k, v in per_lang.items() if v}
    if not per_lang:
        raise RuntimeError("sft: no training records after the language and split filters")
    missing = sorted(set(per_lang) - set(cfg.mix_weights))
    if cfg.mix_weights and missing:
        raise UserError(f"sft.mix_weights: no weight for {', '.join(missing)} (every trained language needs one)")
    extra = sorted(set(cfg.mix_weights) - set(per_lang))
    if extra:
        raise UserError(f"sft.mix_weights: {', '.join(extra)} has no training records here "
                        f"(languages trained: {', '.join(sorted(per_lang))})")

    picks: list[list[int]] | None = None
    effective = per_lang
    if cfg.mix_weights or cfg.mix_temperature != 1.0:
        effective = mix_counts(per_lang, cfg.mix_weights or None, cfg.mix_temperature)
        picks = [[] for _ in paths]
        for lang, want in effective.items():  # rows of a language are numbered across its files
            mine = [i for i, rel in enumerate(files) if rel.split("/")[1] == lang]
            offsets = [0]
            for i in mine:
                offsets.append(offsets[-1] + per_file[i])
            for k in _picks(per_lang[lang], want, f"{cfg.train.seed}:{lang}"):
                j = next(j for j in range(len(mine)) if k < offsets[j + 1])
                picks[mine[j]].append(k - offsets[j])
    n_rows = sum(effective.values())
    from polyalign.stages.core.distributed import rank, world_size

    cache = out.path(f"{work}dataset_cache/rank{rank()}")  # work space: removed before the artifact is committed
    data = Dataset.from_generator(_examples, gen_kwargs={"paths": paths, "picks": picks}, cache_dir=str(cache))
    path = inputs.model(cfg.model)
    tok = load_tokenizer(path, padding_side="right")
    method = cfg.lora.method
    if method == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM

        with LOADING:
            model = AutoModelForCausalLM.from_pretrained(
                path, quantization_config=adapters.quantization_config(), dtype=torch_dtype(inputs.model_dtype(cfg.model)),
                **load_kwargs(path),
            )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = load_causal_lm(path, dtype=inputs.model_dtype(cfg.model))
    t = cfg.train
    steps = t.max_steps if t.max_steps > 0 else math.ceil(
        t.num_epochs * math.ceil(n_rows / (t.batch_size * t.gradient_accumulation_steps * world_size()))
    )
    peft_cfg = adapters.build_peft_config(cfg.lora, model, path, steps)
    ckpt_dir = out.path(f"{work}checkpoints")
    args = SFTConfig(
        **trainer_kwargs(cfg.train, ckpt_dir, cfg.save_steps, cfg.logging_steps),
        max_length=cfg.train.max_length,
        completion_only_loss=True,
        ddp_find_unused_parameters=method == "lisa" or None,  # LISA's frozen layers have no gradient
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_cfg)
    padding_free = cfg.padding_free and method not in adapters.PROMPT_METHODS and keeps_sequences_apart(trainer.model)
    if padding_free:  # the dataset is already tokenized and truncated; only the batching changes
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        trainer.data_collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    elif cfg.padding_free and method not in adapters.PROMPT_METHODS:
        print(f"[sft] {type(model).__name__} mixes packed sequences: batches are padded", flush=True)
    lisa = None
    if method == "lisa":
        from polyalign.stages.core.lisa import lisa_callback

        lisa = lisa_callback(trainer.model, cfg.lora.lisa_layers, cfg.lora.lisa_interval, cfg.train.seed)
        trainer.add_callback(lisa)
    elif method == "adalora":
        trainer.add_callback(adapters.adalora_callback())
    pissa_init = out.path(f"{work}pissa_init")  # work space: PiSSA's starting adapter, to save a plain LoRA
    if method == "pissa" and not (pissa_init / "adapter_config.json").exists():
        trainer.model.peft_config["default"].init_lora_weights = True  # reloading it must not run the SVD again
        trainer.model.save_pretrained(str(pissa_init), safe_serialization=True)
        trainer.model.peft_config["default"].init_lora_weights = "pissa"

    def save() -> None:
        extra = {"path_initial_model_for_weight_conversion": str(pissa_init)} if method == "pissa" else {}
        trainer.model.save_pretrained(str(out.path(model_dir)), safe_serialization=True, **extra)
        if save_tokenizer:
            tok.save_pretrained(str(out.path(model_dir)))

    stats = train_resumable(trainer, ckpt_dir, save, tensorboard="tensorboard" in cfg.train.report_to)
    del trainer, data
    shutil.rmtree(cache.parent, ignore_errors=True)
    shutil.rmtree(pissa_init, ignore_errors=True)
    log_history = stats.pop("log_history")
    out.write_json(f"{work}train_log.json", log_history)
    if lisa is not None:
        out.write_json("lisa_layers.json", lisa.history)
        stats["lisa_draws"] = len(lisa.history)
    stats.update(method=method, padding_free=padding_free, examples=n_rows, examples_per_language=effective,
                 available_per_language=per_lang)
    if picks is not None:
        probs = {k: round(v / n_rows, 4) for k, v in effective.items()}
        stats["mixing"] = {"temperature": cfg.mix_temperature, "weights": cfg.mix_weights or None,
                           "available_per_language": per_lang, "sampling_probabilities": probs}
    return stats


def keeps_sequences_apart(model: Any) -> bool:
    """True when `model` run on two sequences packed into one (positions restarting at the
    second) computes what it computes on each alone: transformers builds a block mask from
    the positions for most architectures, not for all (BLOOM's ALiBi, say)."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            gen = torch.Generator().manual_seed(0)
            vocab = model.get_input_embeddings().weight.shape[0]
            a, b = (torch.randint(10, min(vocab, 1000), (1, n), generator=gen).to(device) for n in (5, 7))
            # no cache, as TRL trains: transformers finds packed sequences only without one
            alone = [model(input_ids=x, use_cache=False).logits for x in (a, b)]
            positions = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
            packed = model(input_ids=torch.cat([a, b], dim=1), position_ids=positions, use_cache=False).logits
            apart = torch.cat(alone, dim=1).float()
            # 16-bit weights: packed and apart shapes round differently; mixing sequences differs by far more
            tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
            return bool(torch.allclose(packed.float(), apart, atol=tol * float(apart.abs().max()) + 1e-4))
    finally:
        model.train(was_training)


def _card(cfg: Config, available: dict[str, int], effective: dict[str, int]) -> str:
    """The card of what the model was trained on: the language mix."""
    how = ("as the data came" if not cfg.mix_weights and cfg.mix_temperature == 1.0 else
           f"resampled by the weights {cfg.mix_weights}" if cfg.mix_weights else
           f"resampled with temperature {cfg.mix_temperature} (probability proportional to count**(1/T))")
    total = sum(effective.values())
    rows = "\n".join(f"| {lang} | {available[lang]} | {effective[lang]} | {effective[lang] / total:.3f} |"
                     for lang in sorted(effective))
    return (f"# SFT training mix\n\nMethod: `{cfg.lora.method}`. Languages mixed {how}.\n\n"
            "| language | records available | examples trained on | share |\n|---|---:|---:|---:|\n"
            f"{rows}\n\nExamples trained on: {total} per epoch.\n")
