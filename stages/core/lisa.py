"""LISA: layerwise importance-sampled fine-tuning (Pan et al., 2024), as a Trainer callback.

The model is fully fine-tuned, but at any time only part of it trains:
- everything outside the decoder layers (embeddings, final norm, output head) always;
- `layers` of the decoder layers, drawn uniformly without replacement every `interval`
  optimizer steps; the others are frozen.

A frozen layer has no gradient and its optimizer state is dropped when it is frozen, so the
optimizer holds moments for the always-trained parts and `layers` decoder layers only: its
memory stays near an adapter's instead of a full fine-tune's (a layer drawn again starts
with fresh moments, as in the paper's implementation).

Every draw is printed and kept in `history` (step, layers). The sampling RNG and the history
are written into each Trainer checkpoint (`lisa_state.json`, before the Trainer's own files,
so a complete checkpoint always has it); a resumed run draws exactly the layers an
uninterrupted one would have.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from polyalign.stages.core.adapters import decoder_layers

STATE = "lisa_state.json"


def lisa_callback(model: Any, layers: int, interval: int, seed: int) -> Any:
    from transformers import TrainerCallback

    from polyalign.stages.core.errors import UserError

    _, blocks = decoder_layers(model)
    if layers > len(blocks):
        raise UserError(f"sft.lora.lisa_layers={layers}: the model has only {len(blocks)} decoder layers")

    class Lisa(TrainerCallback):
        def __init__(self) -> None:
            self.rng = random.Random(seed)
            self.history: list[dict[str, Any]] = []  # {"step": s, "layers": [...]} per draw

        def _apply(self, active: list[int], optimizer: Any) -> None:
            inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
            for i, block in enumerate(blocks):
                on = i in active
                for p in block.parameters():
                    p.requires_grad_(on)
                    if not on:
                        p.grad = None
                        if inner is not None:
                            inner.state.pop(p, None)

        def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            if state.global_step:  # resumed: the checkpoint holds the RNG and the draws so far
                saved = json.loads((Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE).read_text())
                version, internal, gauss = saved["rng"]
                self.rng.setstate((version, tuple(internal), gauss))
                self.history = saved["history"]
            self._apply(self.history[-1]["layers"] if self.history else [], optimizer)

        def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            step = state.global_step
            if step % interval or (self.history and self.history[-1]["step"] == step):
                return
            active = sorted(self.rng.sample(range(len(blocks)), layers))
            self.history.append({"step": step, "layers": active})
            self._apply(active, optimizer)
            print(f"[lisa] step {step}: training decoder layers {active} (+ embeddings and head)", flush=True)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not control.should_save:
                return
            from polyalign.stages.core import distributed

            if not distributed.is_main():
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / (STATE + ".tmp")
            tmp.write_text(json.dumps({"rng": self.rng.getstate(), "history": self.history}))
            tmp.replace(folder / STATE)

    return Lisa()
