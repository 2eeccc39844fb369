"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input, files or configuration (no traceback shown)."""


class ConfigError(UserError):
    """An invalid configuration key or value."""


class DataError(UserError):
    """A required input file or column is missing or malformed."""
