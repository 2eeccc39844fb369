"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input, files or configuration (no traceback shown)."""


class ConfigError(UserError):
    """An invalid configuration key or value."""


class DataError(UserError):
    """A required input file or column is missing or malformed."""


def one_line(message: str) -> str:
    """The user-facing line of an error message.

    An error from a DataLoader worker process is re-raised by torch as
    ``Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...``: its
    own message is the last line of that traceback.
    """
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "error"
    if lines[0].startswith("Caught ") and "Original Traceback" in message:
        _, sep, text = lines[-1].partition(": ")
        return text if sep else lines[-1]
    return lines[0]
