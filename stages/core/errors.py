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
