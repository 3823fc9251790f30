"""Reading user-supplied data files with errors that name the file, line and field."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from polyalign.stages.core.errors import PathError, UserError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def expand_path(path: str | os.PathLike[str]) -> Path:
    """`path` with a leading `~` or `~name` expanded; PathError (one line naming the path)
    when the user or the home folder is unknown, where Path.expanduser raises RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        head = str(path).split("/", 1)[0]
        raise PathError(f"{path}: cannot expand {head!r} (no such user or no home folder here); write the full path") from None


def builtin(name: str) -> Path:
    """Path of a data file shipped inside the package (`stages/data/`)."""
    return DATA_DIR / name


def read_jsonl_checked(path: str | Path, required: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """Read a JSONL file; every row must be an object with the required typed fields."""
    path = expand_path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({exc.args[0]})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object")
            for field, typ in required.items():
                if field not in row:
                    raise UserError(f"{path}:{lineno}: missing field {field!r}")
                if not isinstance(row[field], typ):
                    raise UserError(f"{path}:{lineno}: field {field!r} has type {type(row[field]).__name__}")
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def stable_unit(key: str) -> float:
    """A deterministic number in [0, 1) from a string (for splits that survive reruns)."""
    import hashlib

    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32
