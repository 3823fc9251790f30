"""The stages of the polyalign pipeline and the one registry that names them.

Stage modules import only light libraries at module level (pydantic, stdlib) so that
`polyalign validate` and `polyalign status` stay fast; torch and friends are imported
inside `run`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# stage type -> module. The order is the canonical DAG order used by `polyalign run`.
REGISTRY: dict[str, str] = {
    "self_instruct": "polyalign.stages.self_instruct",
    "translate": "polyalign.stages.translate",
    "sft": "polyalign.stages.sft",
    "preferences": "polyalign.stages.preferences",
    "reward_model": "polyalign.stages.reward_model",
    "align": "polyalign.stages.align",
    "evaluate": "polyalign.stages.evaluate",
}


def load_stage(stage_type: str) -> ModuleType:
    """Import the module of a registered stage type."""
    if stage_type not in REGISTRY:
        known = ", ".join(REGISTRY)
        raise KeyError(f"unknown stage type {stage_type!r} (known: {known})")
    return importlib.import_module(REGISTRY[stage_type])
