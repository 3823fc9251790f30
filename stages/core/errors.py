"""Errors that mean "the user asked for something wrong" or "the store is not what it says";
the CLI prints them on one line (exit code 2, no traceback)."""


class UserError(Exception):
    """A mistake in the user's config, files or command line (exit code 2, no traceback)."""


class ConfigError(UserError):
    """An invalid pipeline or stage config."""


class MissingInputError(UserError):
    """A stage was asked to run but an upstream artifact is not in the store."""


class CorruptArtifactError(UserError):
    """A final artifact's manifest or files do not check out (tampering, disk damage)."""


class CorruptPartialError(UserError):
    """A file of work in progress (a shard marker, say) cannot be read back."""


class StoreError(UserError):
    """The store root is unusable (not a folder, not writable, empty path)."""


class PathError(UserError, ValueError):
    """A path that cannot be resolved (`~name` of a user this machine does not have). A
    ValueError too, so that inside a config validator pydantic reports it at its field."""


_SECRET_NAME = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


def redact(text: str) -> str:
    """`text` with every secret it may hold masked: the values of environment variables whose
    names say they are secrets (..._API_KEY, ..._TOKEN, ...), bearer tokens and `sk-` keys.
    For error messages, logs and crash reports."""
    import os
    import re

    for name, value in os.environ.items():
        if len(value) >= 8 and any(part in name.upper() for part in _SECRET_NAME) and value in text:
            text = text.replace(value, f"<{name}>")
    text = re.sub(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}", r"\1<redacted>", text)
    return re.sub(r"\bsk-[A-Za-z0-9_-]{16,}", "sk-<redacted>", text)


class StorageFault(UserError):
    """The disk under the store failed a write (full, over quota, read-only, I/O error). Not a
    bug: the work finished so far is kept and a rerun resumes from it once the disk is fixed."""
