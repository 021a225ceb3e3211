"""User-facing errors.

`CdamError` is raised for anything the user can fix (bad config, missing file, wrong backbone).
The CLIs catch it and print its message as a single line with a non-zero exit status, never a
traceback. Messages say what was wrong and what to do.
"""


class CdamError(Exception):
    """An error caused by user input; its message is meant to be shown as one line."""


class ConfigError(CdamError, ValueError):
    """An invalid configuration value or key."""


class DataError(CdamError):
    """Missing, empty or unreadable data."""


class CheckpointError(CdamError):
    """A checkpoint that is not a cdam-pl checkpoint, is unsafe, or does not match its backbone."""


class RequestError(CdamError):
    """A request that cannot be served as asked (it names an unknown target or method). `status` is the HTTP status
    a web front end answers it with, so the code that raises it (the web demo's engine) needs no HTTP of its own;
    every other `CdamError` is answered with this class's 400."""

    status = 400


class NotFoundError(RequestError):
    """Something asked for by id or name that does not exist, or no longer does (an image evicted from a cache, an
    unknown example, a concept that was dropped)."""

    status = 404
