"""The artifact store: `<root>/<stage>/<fingerprint>/`, complete once `manifest.json` exists.

Writes go to `<fingerprint>.partial/`; every file is written to a temporary name and renamed
into place, so a file that exists is whole. Completion writes `manifest.json` last (atomic
rename) and then renames the partial folder to its final name. An artifact whose manifest is
missing, unreadable, or disagrees with the files on disk is never taken as complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from polyalign.stages.core.fingerprint import file_digest

MANIFEST = "manifest.json"
STORE_ENV = "POLYALIGN_STORE"


class CorruptArtifactError(Exception):
    """A final artifact folder exists but its manifest or files do not check out."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def atomic_write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Artifact:
    """A complete, verified artifact (read-only)."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    def file(self, rel: str) -> Path:
        return self.path / rel

    def read_json(self, rel: str) -> Any:
        return json.loads((self.path / rel).read_text(encoding="utf-8"))

    def records(self, pattern: str) -> list[dict[str, Any]]:
        """All records of the JSONL files matching `pattern`, in sorted file order."""
        out: list[dict[str, Any]] = []
        for shard in sorted(self.path.glob(pattern)):
            out.extend(read_jsonl(shard))
        return out


class ArtifactWriter:
    """Writes one artifact inside its `.partial` folder; `commit` makes it complete."""

    def __init__(self, store: "Store", stage: str, fp: str):
        self.store = store
        self.stage = stage
        self.fingerprint = fp
        self.dir = store.partial_dir(stage, fp)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics: dict[str, Any] = {}
        self.card: str | None = None
        self.summary: str = ""
        self.models: dict[str, str] = {}  # config field -> model identity (set by the runner)

    def path(self, rel: str) -> Path:
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def exists(self, rel: str) -> bool:
        """True when `rel` was written completely (files appear only by atomic rename)."""
        return (self.dir / rel).exists()

    def write_jsonl(self, rel: str, records: Iterable[dict[str, Any]]) -> int:
        return atomic_write_jsonl(self.path(rel), records)

    def write_json(self, rel: str, obj: Any) -> None:
        atomic_write_json(self.path(rel), obj)

    def write_text(self, rel: str, text: str) -> None:
        atomic_write_text(self.path(rel), text)

    def records(self, pattern: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for shard in sorted(self.dir.glob(pattern)):
            out.extend(read_jsonl(shard))
        return out

    def commit(self, manifest: dict[str, Any]) -> Artifact:
        """Write the manifest last, then promote the folder by rename."""
        files = {}
        for p in sorted(self.dir.rglob("*")):
            if not p.is_file() or p.name == MANIFEST or p.name.startswith("."):
                continue
            rel = p.relative_to(self.dir).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": file_digest(str(p))}
        manifest = dict(manifest, fingerprint=self.fingerprint, files=files, metrics=self.metrics)
        atomic_write_json(self.dir / MANIFEST, manifest)
        final = self.store.final_dir(self.stage, self.fingerprint)
        if final.exists():  # a corrupt leftover; keep it aside for inspection
            final.rename(final.with_name(f"{final.name}.corrupt-{int(time.time())}"))
        os.replace(self.dir, final)
        return self.store.open(self.stage, self.fingerprint)


class Store:
    """A local folder of artifacts (fsspec URLs are a planned extension)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser()

    def final_dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / fp

    def partial_dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / f"{fp}.partial"

    def state(self, stage: str, fp: str) -> str:
        """'cached', 'partial', 'corrupt' or 'missing' (cheap: checks sizes, not digests)."""
        final = self.final_dir(stage, fp)
        if final.exists():
            try:
                self.open(stage, fp)
                return "cached"
            except CorruptArtifactError:
                return "corrupt"
        if self.partial_dir(stage, fp).exists():
            return "partial"  # (one with a valid manifest is promoted by the next run)
        return "missing"

    def size(self, stage: str, fp: str) -> int:
        for d in (self.final_dir(stage, fp), self.partial_dir(stage, fp)):
            if d.exists():
                return _dir_size(d)
        return 0

    def open(self, stage: str, fp: str, deep: bool = False) -> Artifact:
        """Open a complete artifact, checking every file listed in its manifest.

        `deep=True` also recomputes each file's sha256.
        """
        final = self.final_dir(stage, fp)
        mpath = final / MANIFEST
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CorruptArtifactError(f"{final}: unreadable manifest ({exc})") from exc
        if manifest.get("fingerprint") != fp:
            raise CorruptArtifactError(f"{final}: manifest fingerprint does not match folder")
        for rel, meta in manifest.get("files", {}).items():
            p = final / rel
            if not p.is_file() or p.stat().st_size != meta["size"]:
                raise CorruptArtifactError(f"{final}: file {rel} is missing or has the wrong size")
            if deep and file_digest(str(p)) != meta["sha256"]:
                raise CorruptArtifactError(f"{final}: file {rel} does not match its sha256")
        return Artifact(final, manifest)

    def promote_partial(self, stage: str, fp: str) -> bool:
        """Finish a commit cut off between the manifest write and the rename.

        Returns True when the partial folder held a manifest that matches its files and is
        now the final artifact; a stale manifest is removed so the commit is redone.
        """
        partial = self.partial_dir(stage, fp)
        mpath = partial / MANIFEST
        if not mpath.exists():
            return False
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
            ok = manifest.get("fingerprint") == fp and all(
                (partial / rel).is_file() and (partial / rel).stat().st_size == meta["size"]
                for rel, meta in manifest.get("files", {}).items()
            )
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            mpath.unlink(missing_ok=True)
            return False
        final = self.final_dir(stage, fp)
        if final.exists():
            final.rename(final.with_name(f"{final.name}.corrupt-{int(time.time())}"))
        os.replace(partial, final)
        return True

    @contextlib.contextmanager
    def lock(self, stage: str, fp: str) -> Iterator[None]:
        """An exclusive inter-process lock on one artifact (held while committing)."""
        path = self.root / stage / f"{fp}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as handle:
            try:
                import fcntl
            except ImportError:  # not POSIX: no inter-process lock
                yield
                return
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def writer(self, stage: str, fp: str) -> ArtifactWriter:
        (self.partial_dir(stage, fp) / MANIFEST).unlink(missing_ok=True)  # a stale, unpromoted one
        return ArtifactWriter(self, stage, fp)

    def discard_partial(self, stage: str, fp: str) -> None:
        shutil.rmtree(self.partial_dir(stage, fp), ignore_errors=True)
