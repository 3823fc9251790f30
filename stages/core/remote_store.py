"""A store at an fsspec URL (`s3://bucket/prefix`, `gs://...`, `memory://` in tests).

Object stores have no atomic rename, so the local store's promise (a folder is whole once its
name is final) is kept differently there:
- an artifact is published by uploading its files first and its manifest last, to
  `<url>/<stage>/<fingerprint>/`; a crash part-way leaves files without a manifest, which no
  reader takes for an artifact, and the next run that has the artifact uploads it again;
- a remote artifact is complete exactly when its manifest is valid and every file it lists is
  there with the listed size; each file's sha256 is checked as it is downloaded.

Work happens in a local cache of the store (`$POLYALIGN_STORE_CACHE/<name>/`, by default under
`~/.cache/polyalign/stores`): partial folders, checkpoints, journals and locks live there, so a
killed run resumes its unfinished stage on the same machine, and every committed artifact, kept
in the bucket, is reused by any machine (downloaded once into its cache). Credentials come from
the file system's own settings (for S3: the AWS_* variables, ~/.aws, AWS_ENDPOINT_URL for an
S3-compatible server); none of them is written to an artifact or a log.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from polyalign.stages.core.errors import CorruptArtifactError, StoreError
from polyalign.stages.core.store import MANIFEST, Artifact, Store, _digest_or_none, check_manifest

CACHE_ENV = "POLYALIGN_STORE_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "polyalign" / "stores").expanduser()


class RemoteStore(Store):
    """The artifacts live at `url`; `root` is this machine's working copy of them."""

    def __init__(self, url: str, config: str | None = None, overrides: Sequence[str] = ()):
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec comes with datasets
            raise StoreError(f"store {url}: fsspec is not installed") from None
        self.url = url.rstrip("/")
        protocol = self.url.split("://", 1)[0]
        try:
            self.fs = fsspec.filesystem(protocol)
        except (ImportError, ValueError) as exc:
            extra = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(protocol)
            hint = f": pip install {extra}" if extra else ""
            raise StoreError(f"store {url}: no file system for {protocol}:// ({exc}){hint}") from None
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.url.split("://", 1)[1])[-80:]
        tag = hashlib.sha256(self.url.encode()).hexdigest()[:12]
        super().__init__(cache_root() / f"{protocol}-{name}-{tag}", config, overrides)

    @property
    def location(self) -> str:
        return self.url

    def _remote(self, stage: str, fp: str, rel: str = "") -> str:
        return f"{self.url}/{stage}/{fp}" + (f"/{rel}" if rel else "")

    # ------------------------------------------------------------------ the remote copy

    def _remote_manifest(self, stage: str, fp: str) -> dict[str, Any] | None:
        try:
            raw = self.fs.cat_file(self._remote(stage, fp, MANIFEST))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"store {self.url}: cannot read {stage}/{fp[:16]}/{MANIFEST} ({exc})") from None
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:
            raise self.corrupt_error(stage, fp, f"unreadable remote {MANIFEST}") from None

    def has_final(self, stage: str, fp: str) -> bool:
        if self.final_dir(stage, fp).exists():
            return True
        manifest = self._remote_manifest(stage, fp)
        if manifest is None:
            return False
        self._download(stage, fp, manifest)
        return True

    def _download(self, stage: str, fp: str, manifest: dict[str, Any]) -> None:
        """Copy a complete remote artifact into the cache, checking each file, then rename
        the folder into place (locally atomic)."""
        files = self._complete_files(stage, fp, manifest)
        tmp = self.root / stage / f"{fp}.download-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            from tqdm.auto import tqdm

            total = sum(m["size"] for m in files.values())
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {stage}", disable=total < 2**24) as bar:
                for rel, meta in sorted(files.items()):
                    local = tmp / rel
                    local.parent.mkdir(parents=True, exist_ok=True)
                    self.fs.get_file(self._remote(stage, fp, rel), str(local))
                    if _digest_or_none(local) != meta["sha256"]:
                        raise self.corrupt_error(stage, fp, f"remote {rel[:120]} does not match its sha256")
                    bar.update(meta["size"])
            (tmp / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
            final = self.final_dir(stage, fp)
            if final.exists():  # another thread or process of this machine downloaded it meanwhile
                return
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _complete_files(self, stage: str, fp: str, manifest: dict[str, Any], required: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
        """The files table of a remote artifact whose manifest is valid and whose listed files
        are all there with their sizes; otherwise CorruptArtifactError (one line)."""
        try:
            files = check_manifest(manifest, fp, required)
        except ValueError as exc:
            raise self.corrupt_error(stage, fp, f"remote {exc}") from None
        sizes = self._remote_sizes(stage, fp)
        for rel, meta in files.items():
            if sizes.get(rel) != meta["size"]:
                raise self.corrupt_error(stage, fp, f"remote {rel[:120]} is missing or has the wrong size")
        return files

    def _remote_sizes(self, stage: str, fp: str) -> dict[str, int]:
        base = self._remote(stage, fp)
        self.fs.invalidate_cache(base)  # another process may have uploaded since this one listed it
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.fs._strip_protocol(base).rstrip("/") + "/"
        return {str(k)[len(prefix):]: int(v.get("size") or 0) for k, v in found.items() if str(k).startswith(prefix)}

    def published(self, stage: str, fp: str) -> None:
        """Upload a locally complete artifact: its files, then its manifest. When another
        machine published this artifact first, its copy stays (the first one wins)."""
        if self._remote_manifest(stage, fp) is not None:
            return
        final = self.final_dir(stage, fp)
        manifest_bytes = (final / MANIFEST).read_bytes()
        files = json.loads(manifest_bytes.decode("utf-8"))["files"]
        try:
            from tqdm.auto import tqdm

            total = sum(m["size"] for m in files.values())
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload {stage}", disable=total < 2**24) as bar:
                for rel, meta in sorted(files.items()):
                    self.fs.put_file(str(final / rel), self._remote(stage, fp, rel))
                    bar.update(meta["size"])
            self.fs.pipe_file(self._remote(stage, fp, MANIFEST), manifest_bytes)  # last: now it is complete
        except OSError as exc:
            raise StoreError(f"store {self.url}: cannot upload {stage}/{fp[:16]} ({exc}); the artifact is kept in "
                             f"{final} and uploaded by the next run") from None

    def diagnose(self, stage: str, fp: str, required: Sequence[str] = (), deep: bool = False) -> tuple[str, str | None]:
        """As Store.diagnose; an artifact only in the bucket is judged there (manifest and
        sizes) without downloading it, unless `deep`."""
        if self.final_dir(stage, fp).exists() or deep:
            return super().diagnose(stage, fp, required, deep)
        manifest = self._remote_manifest(stage, fp)
        if manifest is not None:
            try:
                self._complete_files(stage, fp, manifest, required)
            except CorruptArtifactError as exc:
                return "corrupt", str(exc)
            return "cached", None
        return super().diagnose(stage, fp, required, deep)

    def open(self, stage: str, fp: str, deep: bool = False, required: Sequence[str] = ()) -> Artifact:
        if not self.final_dir(stage, fp).exists():
            self.has_final(stage, fp)  # downloads it when the bucket has it
        art = super().open(stage, fp, deep=deep, required=required)
        if self._remote_manifest(stage, fp) is None:  # committed here, never uploaded (a crash)
            self.published(stage, fp)
        return art

    # ------------------------------------------------------------------ maintenance

    def check_root(self, writable: bool) -> None:
        super().check_root(writable)
        if not writable:
            return
        probe = f"{self.url}/.write-test-{os.getpid()}"
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except (OSError, ValueError) as exc:
            raise StoreError(f"store {self.url}: not writable ({exc})") from None

    def size(self, stage: str, fp: str) -> int:
        local = super().size(stage, fp)
        return local or sum(self._remote_sizes(stage, fp).values())

    def remove(self, stage: str, fp: str | None = None) -> list[Path]:
        removed = super().remove(stage, fp)
        base = f"{self.url}/{stage}"
        try:
            names = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            names = []
        for name in names:
            leaf = str(name).rstrip("/").rsplit("/", 1)[-1]
            if fp is None or leaf == fp:
                self.fs.rm(f"{base}/{leaf}", recursive=True)
                removed.append(Path(f"{base}/{leaf}"))
        return removed
