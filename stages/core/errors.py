"""Errors that mean "the user asked for something wrong"; the CLI prints them on one line."""


class UserError(Exception):
    """A mistake in the user's config, files or command line (exit code 2, no traceback)."""


class ConfigError(UserError):
    """An invalid pipeline or stage config."""


class MissingInputError(UserError):
    """A stage was asked to run but an upstream artifact is not in the store."""
