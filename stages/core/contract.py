"""The stage contract: what a stage's functions receive, and the one loop that runs a stage.

A stage module has `VERSION`, `Config`, `INPUTS` (and maybe `OPTIONAL_INPUTS`), `OUTPUTS`
(file patterns every artifact of the stage holds: a manifest without them is corrupt), and
optionally `check_config(cfg, models, input_names)` (a one-line problem or None, at config
time), and either `run(cfg, inputs, out)` or, for a stage that fans out (one unit per language),
`units(cfg)`, `run_unit(cfg, inputs, out, unit)` and `finish(cfg, inputs, out)`.

`inputs` is an `Inputs` (upstream artifacts by input name, and the models of the pipeline's
`models:` table); `out` is the `ArtifactWriter` of the stage's partial folder. This module is
light (no torch, no Prefect): stages import it at module level for their annotations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from types import ModuleType
from typing import TYPE_CHECKING, Any

from polyalign.stages.core.store import Artifact, ArtifactWriter

if TYPE_CHECKING:
    from polyalign.stages.core.model_specs import ModelSpec

__all__ = ["Artifact", "ArtifactWriter", "Inputs", "run_module", "is_fan_out"]


class Inputs:
    """What a stage receives: upstream artifacts by input name, and model resolution."""

    def __init__(
        self,
        artifacts: dict[str, Artifact],
        model_path: Callable[[str], str],
        model_dtype: Callable[[str], str],
        model_spec: "Callable[[str], ModelSpec] | None" = None,
    ):
        self.artifacts = artifacts
        self._model_path = model_path
        self._model_dtype = model_dtype
        self._model_spec = model_spec

    def __getitem__(self, name: str) -> Artifact:
        return self.artifacts[name]

    def get(self, name: str) -> Artifact | None:
        return self.artifacts.get(name)

    def model(self, name: str) -> str:
        """A loadable path (or hub id) for a model of the pipeline's `models:` table."""
        return self._model_path(name)

    def model_dtype(self, name: str) -> str:
        return self._model_dtype(name)

    def spec(self, name: str) -> "ModelSpec":
        if self._model_spec is None:
            raise RuntimeError("these inputs carry no model specs")
        return self._model_spec(name)

    def backend(
        self, name: str, adapters: Sequence[str] = (), batch_size: int = 8, progress: bool = True
    ) -> AbstractContextManager[Any]:
        """A generation backend (see `core.backends`) for model `name`, with `adapters`."""
        from polyalign.stages.core.backends import open_backend

        spec = self.spec(name)
        path = None if spec.remote else self.model(name)
        return open_backend(name, spec, path, adapters, batch_size=batch_size, progress=progress)

    def translator(
        self, name: str, source: str, target: str, declared: str | None = None, batch_size: int = 8, num_beams: int = 1
    ) -> AbstractContextManager[Any]:
        """A machine-translation backend (`core.backends.mt`) for model `name`, translating
        `source` -> `target` (`declared`: the target a single-pair model was configured for)."""
        from polyalign.stages.core.backends.mt import open_mt
        from polyalign.stages.core.errors import UserError

        spec = self.spec(name)
        if spec.remote:
            raise UserError(f"models.{name}: backend mt runs a sequence-to-sequence model here; an API model translates with backend: llm")
        return open_mt(name, self.model(name), spec.dtype, source, target, declared, batch_size=batch_size, num_beams=num_beams, progress=False)

    def priced(self, name: str, usage: dict[str, int]) -> dict[str, Any]:
        """`usage` of model `name` with its cost where the config gives a price table."""
        api = self.spec(name).openai if self._model_spec is not None else None
        price = api.price if api is not None else None
        if price is None:
            return dict(usage)
        cost = usage.get("prompt_tokens", 0) * price.input_per_million + usage.get("completion_tokens", 0) * price.output_per_million
        return {**usage, "cost": round(cost / 1e6, 6)}


def is_fan_out(module: ModuleType) -> bool:
    return hasattr(module, "units")


def run_module(
    module: ModuleType,
    cfg: Any,
    inputs: Inputs,
    out: ArtifactWriter,
    done: Callable[[str], bool] = lambda unit: False,
) -> None:
    """Run a stage into `out`: `run`, or every unit not `done` and then `finish`."""
    if not is_fan_out(module):
        module.run(cfg, inputs, out)
        return
    for unit in module.units(cfg):
        if not done(unit):
            module.run_unit(cfg, inputs, out, unit)
    module.finish(cfg, inputs, out)
