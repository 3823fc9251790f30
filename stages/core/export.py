"""`polyalign export`: what a pipeline trained, usable without polyalign.

- merged (default): the base model with the SFT adapter merged, and the aligned adapter too
  for `--stage align`, saved as an ordinary Hugging Face folder (safetensors weights, the
  tokenizer with its chat template, the generation config) that plain transformers loads and
  vLLM serves;
- `--adapters`: the adapters themselves (`sft/`, and `align/` for `--stage align`), each
  with `base_model_name_or_path` set to the base model's Hub id when it has one (else its
  local path), to be applied in that order.
Either way a README.md model card carries the provenance (pipeline, stage fingerprints, base
model identity), the languages and, when the pipeline's evaluation is in the store, its
results table. The folder is written beside OUT and renamed into place when complete; an
existing non-empty OUT is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from polyalign.stages.core.errors import UserError


def _artifact(pipe: Any, stage: str) -> Any:
    plans = {p.name: p for p in pipe.plan()}
    if stage not in plans:
        raise UserError(f"--stage: the pipeline has no stage {stage!r} (stages: {', '.join(plans)})")
    plan = plans[stage]
    if plan.state != "cached":
        raise UserError(f"stage {stage!r} has no artifact in {pipe.store.location} (state: {plan.state}); run `polyalign run` first")
    return pipe.store.open(stage, plan.fingerprint)


def _card(pipe: Any, stage: str, arts: dict[str, Any], base_id: str, adapters: bool) -> str:
    languages = sorted({lang for node in pipe.nodes.values() for lang in getattr(node.config, "languages", []) or []})
    lines = [
        "---",
        "library_name: " + ("peft" if adapters else "transformers"),
        f"base_model: {base_id}",
        "language:",
        *[f"- {lang}" for lang in languages],
        "tags:",
        "- polyalign",
        "- multilingual",
        "---",
        "",
        f"# {pipe.name}: {stage} model exported by polyalign",
        "",
        f"Base model `{base_id}`, fine-tuned by the polyalign pipeline `{pipe.name}` "
        f"(self-instruct, translation, SFT{', preference alignment' if stage == 'align' else ''}).",
        "",
        "## How to load",
        "",
    ]
    if adapters:
        lines += [
            "Apply the adapters in order on the base model (peft): `sft/`, then `align/` if present.",
        ]
    else:
        lines += ["`AutoModelForCausalLM.from_pretrained(THIS_FOLDER)`; the tokenizer carries the chat template used in training."]
    lines += ["", "## Provenance", ""]
    for name, art in arts.items():
        m = art.metrics
        lines.append(f"- {name}: artifact {art.fingerprint[:16]}" + (f", {m['global_step']} steps" if "global_step" in m else "") + (f", {m['steps']} PPO steps" if "steps" in m and "global_step" not in m else ""))
    lines += [f"- languages: {', '.join(languages) or 'en'}"]
    evals = [p for p in pipe.plan() if p.type == "evaluate" and p.state == "cached"]
    for plan in evals:
        table = pipe.store.open(plan.name, plan.fingerprint).read_bytes("results.md").decode("utf-8")
        lines += ["", f"## Evaluation ({plan.name})", "", table.strip()]
    if not evals:
        lines += ["", "## Evaluation", "", "No evaluation of this pipeline is in the store."]
    return "\n".join(lines) + "\n"


def export(pipe: Any, out: str, stage: str = "align", adapters: bool = False) -> Path:
    from polyalign.stages.core.model_specs import local_dir
    from polyalign.stages.core.prepare import ensure_model

    if stage not in ("sft", "align"):
        raise UserError(f"--stage: sft or align, not {stage!r}")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{out}: already exists and is not empty; choose a new folder")
    chain = ["sft"] if stage == "sft" else ["sft", stage]
    arts = {name: _artifact(pipe, name) for name in chain}
    from polyalign.stages.core.adapters import sft_model

    sft_model(arts["sft"], stage="export")  # per-language plugins: a one-line error (no single model to export)
    model_name = pipe.nodes[stage].config.model
    spec = pipe.header.models[model_name]
    base_path = ensure_model(spec, pipe.models_root)
    base_id = spec.hub or str(local_dir(spec, pipe.models_root) or base_path)
    tmp = target.with_name(f".{target.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if adapters:
            for name, art in arts.items():
                folder = art.file("model")
                if not (folder / "adapter_config.json").exists():
                    raise UserError(f"stage {name!r} trained the full model, not an adapter; export without --adapters")
                shutil.copytree(folder, tmp / name)
                config = json.loads((tmp / name / "adapter_config.json").read_text())
                config["base_model_name_or_path"] = base_id
                (tmp / name / "adapter_config.json").write_text(json.dumps(config, indent=2))
        else:
            from polyalign.stages.core.loading import load_causal_lm, load_tokenizer

            model = load_causal_lm(base_path, [str(arts[name].file("model")) for name in chain], spec.dtype)
            model.to("cpu")
            model.save_pretrained(str(tmp), safe_serialization=True)
            load_tokenizer(base_path, padding_side="left").save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_card(pipe, stage, arts, base_id, adapters), encoding="utf-8")
        (tmp / "polyalign_export.json").write_text(json.dumps({
            "pipeline": pipe.name, "stage": stage, "adapters": adapters, "base_model": base_id,
            "artifacts": {name: art.fingerprint for name, art in arts.items()},
        }, indent=2))
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
