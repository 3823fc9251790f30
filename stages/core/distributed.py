"""Training stages under `accelerate launch` / `torchrun` (several processes, one per device).

Every process runs the stage's trainer (the Trainer wraps the model for data parallelism);
only the main process (rank 0) writes: it takes the artifact's lock, saves the model, writes
markers, metrics and the card, and commits. The other processes write nothing in the store:
their `ArtifactWriter` is a `FollowerWriter`, whose writes are dropped. After training the
followers wait at a barrier until the main process has committed, then open the artifact.
The rank comes from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK).
"""

from __future__ import annotations

import os
from typing import Any

from polyalign.stages.core.store import ArtifactWriter


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every process (a no-op in a single process or before the group exists)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class FollowerWriter(ArtifactWriter):
    """The writer of a non-main process: reads the work folder (checkpoints to resume from),
    writes nothing into it."""

    def write_jsonl(self, rel: str, records: Any) -> int:
        return sum(1 for _ in records)

    def write_json(self, rel: str, obj: Any) -> None:
        return None

    def write_text(self, rel: str, text: str) -> None:
        return None
