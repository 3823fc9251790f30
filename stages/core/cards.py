"""Hugging Face style data cards rendered from a stage's own record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).resolve().parents[2] / "data_cards" / "dataset_card.md.j2"


def _template_path() -> Path:
    if TEMPLATE.exists():  # source checkout / editable install
        return TEMPLATE
    from importlib.resources import files

    return Path(str(files("polyalign.data_cards").joinpath("dataset_card.md.j2")))


def size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "n>1M"


def render_card(
    *,
    pretty_name: str,
    description: str,
    stage: str,
    stage_version: str,
    fingerprint: str,
    languages: list[str],
    counts: dict[str, Any],
    total: int,
    models: dict[str, str] | None = None,
    provenance: list[str] | None = None,
    filters: list[str] | None = None,
    samples: list[dict[str, Any]] | None = None,
    license: str = "other",
    task_categories: list[str] | None = None,
    machine_translated: bool = False,
    synthetic: bool = True,
) -> str:
    """Render the dataset card markdown (YAML header + body)."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = env.from_string(_template_path().read_text(encoding="utf-8"))
    return template.render(
        pretty_name=pretty_name,
        description=description,
        stage=stage,
        stage_version=stage_version,
        fingerprint=fingerprint,
        languages=sorted(set(languages)),
        license=license,
        size_category=size_category(total),
        task_categories=task_categories or ["text-generation"],
        machine_translated=machine_translated,
        synthetic=synthetic,
        provenance=provenance or [],
        models=models or {},
        counts=counts,
        filters=filters or [],
        samples=[json.dumps(s, ensure_ascii=False, indent=2)[:1500] for s in (samples or [])[:3]],
    )
