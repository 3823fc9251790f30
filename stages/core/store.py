"""The artifact store: `<root>/<stage>/<fingerprint>/`, complete exactly when its manifest
matches its files.

Writes go to `<fingerprint>.partial/`; every file is written to a temporary name and renamed
into place, so a file that exists is whole. Completion writes `manifest.json` last (atomic
rename) and then renames the partial folder to its final name.

Reading keeps that promise:
- a manifest is checked against a schema (relative paths inside the artifact, sizes and
  sha256 present, the files the stage declares) before anything else; a bad one makes the
  artifact `corrupt`, never `cached`;
- an artifact is read only through its manifest: `records`, `read_json` and `read_bytes`
  take the files it lists and check each one's sha256 on the bytes they read; `file` checks
  a listed file, or every file of a listed folder (model weights), once per process while
  its size and mtime stay the same. A file dropped into an artifact is never read;
- `open(deep=True)` (`polyalign status --verify`) hashes every file and refuses unlisted ones.
Work in progress is read back through the writer, which names a file that does not parse
and the way out instead of failing with a traceback.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from polyalign.stages.core.errors import (
    CorruptArtifactError,
    CorruptPartialError,
    StoreError,
)
from polyalign.stages.core.fingerprint import file_digest
from polyalign.stages.core.io import expand_path

MANIFEST = "manifest.json"
STORE_ENV = "POLYALIGN_STORE"
_HEX = set("0123456789abcdef")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk leaves no half-written temporary behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def atomic_write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records one line each as they come (a generator is never held in memory whole);
    the file appears complete or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-empty line, read one line at a time."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield i, json.loads(line)


def parse_jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def glob_match(rel: str, pattern: str) -> bool:
    """`Path.glob` semantics on a relative posix path: same depth, each part matches."""
    parts, pats = rel.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, p) for a, p in zip(parts, pats))


def _dir_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:  # a run may rename its temporary files meanwhile
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            continue
    return total


def _digest_or_none(path: Path) -> str | None:
    try:
        return file_digest(str(path))
    except OSError:
        return None


def _bad_path(rel: Any) -> str | None:
    """Why `rel` is not a file path inside an artifact, or None."""
    if not isinstance(rel, str) or not rel:
        return "not a path"
    if "\\" in rel or "\x00" in rel:
        return "not a plain relative path"
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("/"):
        return "absolute path"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "path leaves the artifact or is not normalised"
    if rel == MANIFEST:
        return "the manifest cannot list itself"
    return None


def check_manifest(manifest: Any, fp: str, required: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Validate a parsed manifest; returns its `files` table or raises ValueError (one line)."""
    if not isinstance(manifest, dict):
        raise ValueError(f"manifest is a {type(manifest).__name__}, not an object")
    if manifest.get("fingerprint") != fp:
        raise ValueError("manifest fingerprint does not match the folder name")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError("manifest has no 'files' table")
    for rel, meta in files.items():
        why = _bad_path(rel)
        if why:
            raise ValueError(f"manifest entry {rel!r}: {why}")
        if not isinstance(meta, dict):
            raise ValueError(f"manifest entry {rel!r}: expected an object with size and sha256")
        size, digest = meta.get("size"), meta.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"manifest entry {rel!r}: missing or invalid 'size'")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
            raise ValueError(f"manifest entry {rel!r}: missing or invalid 'sha256'")
    for entry in required:  # "a|b": one of them
        if not any(glob_match(rel, pattern) for pattern in entry.split("|") for rel in files):
            raise ValueError(f"manifest lists no {entry!r}, which this stage always writes")
    for key, typ in (("metrics", dict), ("summary", str), ("inputs", dict), ("models", dict)):
        if key in manifest and not isinstance(manifest[key], typ):
            raise ValueError(f"manifest {key!r} is not a{'n object' if typ is dict else ' string'}")
    return files


# verified files: absolute path -> (size, mtime_ns, ctime_ns, inode, sha256); see Artifact.file
_verified: dict[str, tuple[int, int, int, int, str]] = {}
_verified_lock = threading.Lock()


class Artifact:
    """A complete artifact (read-only). Every read goes through its manifest."""

    def __init__(self, store: "Store", stage: str, path: Path, manifest: dict[str, Any]):
        self.store = store
        self.stage = stage
        self.path = path
        self.manifest = manifest
        self.files: dict[str, dict[str, Any]] = manifest["files"]

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.manifest.get("metrics", {}))

    def _corrupt(self, why: str) -> CorruptArtifactError:
        return self.store.corrupt_error(self.stage, self.fingerprint, why)

    def listed(self, pattern: str) -> list[str]:
        """Manifest paths matching a glob pattern (`data/*/*.jsonl`), sorted."""
        return sorted(rel for rel in self.files if glob_match(rel, pattern))

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of a listed file, checked against the manifest's sha256 as read."""
        meta = self.files.get(rel)
        if meta is None:
            raise self._corrupt(f"{rel} is not listed in its manifest")
        try:
            data = (self.path / rel).read_bytes()
        except OSError as exc:
            raise self._corrupt(f"{rel} cannot be read ({exc.strerror or exc})") from None
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise self._corrupt(f"{rel} does not match its sha256")
        return data

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError as exc:  # matches its digest, yet is no JSON: written wrong
            raise self._corrupt(f"{rel} is not valid JSON ({exc})") from None

    def records(self, pattern: str) -> list[dict[str, Any]]:
        """All records of the listed JSONL files matching `pattern`, in sorted file order."""
        out: list[dict[str, Any]] = []
        for rel in self.listed(pattern):
            try:
                out.extend(parse_jsonl(self.read_bytes(rel)))
            except ValueError as exc:
                raise self._corrupt(f"{rel} is not valid JSONL ({exc})") from None
        return out

    def iter_records(self, pattern: str) -> Iterator[dict[str, Any]]:
        """The records of `records(pattern)`, one at a time: each file is checked against its
        digest first (streamed, remembered per process), then parsed line by line, so memory
        stays bounded however many records there are."""
        for rel in self.listed(pattern):
            self._verify(rel)
            try:
                for _, row in iter_jsonl(self.path / rel):
                    yield row
            except OSError as exc:
                raise self._corrupt(f"{rel} cannot be read ({exc.strerror or exc})") from None
            except ValueError as exc:
                raise self._corrupt(f"{rel} is not valid JSONL ({exc})") from None

    def count_records(self, pattern: str) -> int:
        """How many records `iter_records(pattern)` yields, counted without parsing them."""
        n = 0
        for rel in self.listed(pattern):
            self._verify(rel)
            with open(self.path / rel, "rb") as f:
                n += sum(1 for line in f if line.strip())
        return n

    def file(self, rel: str) -> Path:
        """The path of a listed file, or of a folder whose files are all listed (a model),
        after checking their digests. Checks are remembered per process while a file keeps
        its size, mtime and inode, so large weights are hashed once."""
        target = self.path / rel
        prefix = rel.rstrip("/") + "/"
        members = [r for r in self.files if r == rel or r.startswith(prefix)]
        if not members:
            raise self._corrupt(f"{rel} is not listed in its manifest")
        if target.is_dir():
            for p in target.rglob("*"):
                if p.is_file() and not p.name.startswith("."):
                    member = p.relative_to(self.path).as_posix()
                    if member not in self.files:
                        raise self._corrupt(f"{member} is not listed in its manifest")
        for member in members:
            self._verify(member)
        return target

    def _verify(self, rel: str) -> None:
        meta = self.files[rel]
        p = self.path / rel
        try:
            st = p.stat()
        except OSError:
            raise self._corrupt(f"{rel} is missing") from None
        key = str(p.resolve())
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)  # ctime: `touch -r` cannot restore it
        with _verified_lock:
            seen = _verified.get(key)
        if seen is not None and seen[:4] == stamp and seen[4] == meta["sha256"]:
            return
        if st.st_size != meta["size"] or _digest_or_none(p) != meta["sha256"]:
            raise self._corrupt(f"{rel} does not match its sha256 (or cannot be read)")
        with _verified_lock:
            _verified[key] = (*stamp, meta["sha256"])


def _reason(exc: BaseException) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc).splitlines() or [""])[0][:120]
    return f"{type(exc).__name__}: {reason}"


class ArtifactWriter:
    """Writes one artifact inside its `.partial` folder; `commit` makes it complete."""

    def __init__(self, store: "Store", stage: str, fp: str):
        self.store = store
        self.stage = stage
        self.fingerprint = fp
        self.dir = store.partial_dir(stage, fp)
        if self.dir.exists() and not self.dir.is_dir():
            raise CorruptPartialError(
                f"{self.dir}: the work folder of stage {stage!r} is not a folder; "
                f"{store.clean_hint(stage)} to start the stage over"
            )
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

    def unreadable(self, path: Path, why: str, marker: bool) -> CorruptPartialError:
        """The one-line error for a work file that does not read back. Deleting a marker
        (the file that says a shard, round or unit is done) redoes that part; any other
        file needs the stage started over."""
        way_out = f"delete that file to redo its part, or {self.store.clean_hint(self.stage)}" if marker else self.store.clean_hint(self.stage)
        return CorruptPartialError(
            f"{path}: work file of stage {self.stage!r} cannot be read back ({why}); {way_out} to start the stage over"
        )

    def read_json(self, rel: str, keys: Sequence[str] = ()) -> Any:
        """A marker written by `write_json`; with `keys`, an object with those numbers."""
        path = self.dir / rel
        try:
            obj = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise self.unreadable(path, _reason(exc), marker=True) from None
        if keys:
            if not isinstance(obj, dict):
                raise self.unreadable(path, f"expected an object, found {type(obj).__name__}", marker=True)
            for key in keys:
                if not isinstance(obj.get(key), (int, float)) or isinstance(obj.get(key), bool):
                    raise self.unreadable(path, f"no number {key!r}", marker=True)
        return obj

    def records(self, pattern: str, keys: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Records of the work folder's JSONL files matching `pattern`; each an object that
        has `keys`."""
        return list(self.iter_records(pattern, keys))

    def iter_records(self, pattern: str, keys: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        """`records(pattern, keys)` one record at a time (bounded memory)."""
        for shard in sorted(self.dir.glob(pattern)):
            try:
                for i, row in iter_jsonl(shard):
                    if not isinstance(row, dict) or any(k not in row for k in keys):
                        raise self.unreadable(shard, f"record {i} is not an object with {', '.join(keys) or 'fields'}", marker=False)
                    yield row
            except (OSError, ValueError) as exc:
                raise self.unreadable(shard, _reason(exc), marker=False) from None

    def journal(self, name: str) -> "Journal":
        """The request journal `name` (see `Journal`), under `journal/` of the work folder."""
        return Journal(self, f"{JOURNAL_DIR}/{name}.jsonl")

    def commit(self, manifest: dict[str, Any]) -> Artifact:
        """Write the manifest last, then promote the folder by rename. Request journals are
        work in progress, not results: they are removed first."""
        shutil.rmtree(self.dir / JOURNAL_DIR, ignore_errors=True)
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
        self.store.published(self.stage, self.fingerprint)
        return self.store.open(self.stage, self.fingerprint)


JOURNAL_DIR = "journal"


class Journal:
    """Append-only JSONL of finished requests in a work folder, keyed by `key`.

    Each `append` is one `write` of whole lines on an O_APPEND file, flushed to the OS, so a
    killed process loses at most the lines of the write in flight; a torn last line is
    ignored on reading (that request is asked again). A torn line anywhere else means the
    file was damaged and is reported like any other unreadable work file.
    """

    def __init__(self, writer: "ArtifactWriter", rel: str):
        self.writer = writer
        self.path = writer.path(rel)
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise self.writer.unreadable(self.path, _reason(exc), marker=False) from None
        rows: dict[str, dict[str, Any]] = {}
        lines = data.split(b"\n")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except ValueError:
                if i == len(lines):  # the write in flight when the process died
                    break
                raise self.writer.unreadable(self.path, f"line {i} is not JSON", marker=False) from None
            if not isinstance(row, dict) or not isinstance(row.get("key"), str):
                raise self.writer.unreadable(self.path, f"line {i} has no 'key'", marker=False)
            rows[row["key"]] = row
        return rows

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        blob = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def open_store(root: str | os.PathLike[str], config: str | None = None, overrides: Sequence[str] = ()) -> "Store":
    """A store at a local folder, a `file://` URL, or an fsspec URL (`s3://`, `gs://`, ...:
    see stages/core/remote_store.py)."""
    text = str(root)
    if text.startswith("file://"):
        return Store(text.removeprefix("file://"), config, overrides)
    if "://" in text:
        from polyalign.stages.core.remote_store import RemoteStore

        return RemoteStore(text, config, overrides)
    return Store(root, config, overrides)



# kernel and virtual file systems: a folder there cannot hold a store (and `status` must not
# report an empty one there as "missing")
_PSEUDO = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
           "pstore", "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs", "binfmt_misc", "autofs", "efivarfs"}


def pseudo_file_system(path: Path) -> str | None:
    """The type of the file system `path` (or, if it does not exist, its nearest existing
    folder) is on, when that is one of the kernel's virtual ones; None otherwise or where
    the mount table cannot be read."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, parts[2]
    return kind if kind in _PSEUDO else None

class Store:
    """A local folder of artifacts (`RemoteStore` adds an object store behind one).

    `config` is the pipeline file the store serves; it only makes error messages say the
    exact command that rebuilds a stage.
    """

    def __init__(self, root: str | os.PathLike[str], config: str | None = None, overrides: Sequence[str] = ()):
        if not str(root).strip():
            raise StoreError("store: empty path (give a folder with --store, $POLYALIGN_STORE or `store:`)")
        self.root = expand_path(root)
        self.config = config
        self.overrides = list(overrides)

    @property
    def location(self) -> str:
        """Where the artifacts are, as the user named it (for messages)."""
        return str(self.root)

    def has_final(self, stage: str, fp: str) -> bool:
        """Whether a final folder exists for this artifact (complete or corrupt)."""
        return self.final_dir(stage, fp).exists()

    def published(self, stage: str, fp: str) -> None:
        """Called once an artifact is complete here (a remote store uploads it)."""

    # ------------------------------------------------------------------ places and states

    def final_dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / fp

    def partial_dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / f"{fp}.partial"

    def clean_hint(self, stage: str) -> str:
        """The exact command that removes this stage's artifact of this config."""
        import shlex

        args = ["polyalign", "clean", stage, self.config or "CONFIG", "--store", self.location]
        for item in self.overrides:
            args += ["--set", item]
        return f"run `{shlex.join(args)}`"

    def corrupt_error(self, stage: str, fp: str, why: str) -> CorruptArtifactError:
        return CorruptArtifactError(
            f"artifact {stage}/{fp[:16]} in {self.location} is corrupt: {why}; "
            f"{self.clean_hint(stage)} and run again to rebuild it"
        )

    def check_root(self, writable: bool) -> None:
        """A one-line StoreError unless the root is a folder (and, to write, a writable one),
        on a file system that holds files (not /proc, /sys, /dev and their kind)."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.root}: exists and is not a folder")
        kind = pseudo_file_system(self.root)
        if kind:
            raise StoreError(f"store {self.root}: on a {kind} file system, which holds no files; choose another folder")
        if not writable:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"store {self.root}: not writable ({exc.strerror or exc})") from None

    def diagnose(self, stage: str, fp: str, required: Sequence[str] = (), deep: bool = False) -> tuple[str, str | None]:
        """(state, why it is corrupt or None): 'cached', 'partial', 'corrupt' or 'missing'.
        Cheap (sizes, not digests) unless `deep`."""
        if self.has_final(stage, fp):
            try:
                self.open(stage, fp, deep=deep, required=required)
                return "cached", None
            except CorruptArtifactError as exc:
                return "corrupt", str(exc)
        if self.partial_dir(stage, fp).exists():
            return "partial", None  # (one with a valid manifest is promoted by the next run)
        return "missing", None

    def state(self, stage: str, fp: str, required: Sequence[str] = ()) -> str:
        return self.diagnose(stage, fp, required)[0]

    def size(self, stage: str, fp: str) -> int:
        for d in (self.final_dir(stage, fp), self.partial_dir(stage, fp)):
            if d.is_dir():
                return _dir_size(d)
        return 0

    def open(self, stage: str, fp: str, deep: bool = False, required: Sequence[str] = ()) -> Artifact:
        """Open a complete artifact: its manifest is valid and every listed file has its size.

        `deep=True` also recomputes each file's sha256 and refuses files the manifest does
        not list. Raises CorruptArtifactError (one line) otherwise.
        """
        final = self.final_dir(stage, fp)
        if not final.is_dir():
            raise self.corrupt_error(stage, fp, "not a folder")
        try:
            manifest = json.loads((final / MANIFEST).read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise self.corrupt_error(stage, fp, f"unreadable {MANIFEST} ({type(exc).__name__})") from None
        try:
            files = check_manifest(manifest, fp, required)
        except ValueError as exc:
            raise self.corrupt_error(stage, fp, str(exc)) from None
        for rel, meta in files.items():
            p = final / rel
            try:
                ok = p.is_file() and p.stat().st_size == meta["size"]
            except OSError:  # a name too long for the file system, a folder we may not enter
                ok = False
            if not ok:
                raise self.corrupt_error(stage, fp, f"{rel[:120]} is missing or has the wrong size")
        art = Artifact(self, stage, final, manifest)
        if deep:
            for rel in sorted(files):
                if _digest_or_none(final / rel) != files[rel]["sha256"]:
                    raise self.corrupt_error(stage, fp, f"{rel} does not match its sha256 (or cannot be read)")
            for p in sorted(final.rglob("*")):
                rel = p.relative_to(final).as_posix()
                if p.is_file() and rel != MANIFEST and not p.name.startswith(".") and rel not in files:
                    raise self.corrupt_error(stage, fp, f"{rel} is not listed in its manifest")
        return art

    def promote_partial(self, stage: str, fp: str, required: Sequence[str] = ()) -> bool:
        """Finish a commit cut off between the manifest write and the rename.

        Returns True when the partial folder held a manifest that matches its files and is
        now the final artifact; a stale or invalid manifest is removed so the commit is redone.
        """
        partial = self.partial_dir(stage, fp)
        mpath = partial / MANIFEST
        if not mpath.exists():
            return False
        try:
            files = check_manifest(json.loads(mpath.read_bytes().decode("utf-8")), fp, required)
            ok = all(
                (partial / rel).is_file()
                and (partial / rel).stat().st_size == meta["size"]
                and file_digest(str(partial / rel)) == meta["sha256"]
                for rel, meta in files.items()
            )
        except (OSError, ValueError):
            ok = False
        if not ok:
            mpath.unlink(missing_ok=True)
            return False
        final = self.final_dir(stage, fp)
        if final.exists():
            final.rename(final.with_name(f"{final.name}.corrupt-{int(time.time())}"))
        os.replace(partial, final)
        self.published(stage, fp)
        return True

    @contextlib.contextmanager
    def lock(self, stage: str, fp: str, unit: str | None = None) -> Iterator[None]:
        """An exclusive inter-process lock on one artifact (held while committing), or on
        one of its fan-out units (held while the unit runs)."""
        path = self.root / stage / (f"{fp}.{unit}.lock" if unit else f"{fp}.lock")
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
        stale = self.partial_dir(stage, fp) / MANIFEST
        if stale.is_file():
            stale.unlink()  # a stale, unpromoted one
        return ArtifactWriter(self, stage, fp)

    def discard_partial(self, stage: str, fp: str) -> None:
        shutil.rmtree(self.partial_dir(stage, fp), ignore_errors=True)

    def remove(self, stage: str, fp: str | None = None) -> list[Path]:
        """Delete a stage's artifact, work folder, lock and set-aside corrupt copies (of one
        fingerprint, or of every fingerprint when `fp` is None). Returns what was removed."""
        folder = self.root / stage
        if not folder.is_dir():
            return []
        removed = []
        for p in sorted(folder.iterdir()):
            if fp is not None and not (p.name == fp or p.name.startswith(fp + ".")):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        return removed
