"""Errors that end a run with a clear one-line message.

Every error a user can fix (bad config, missing column, missing model file,
checksum mismatch, no dominant cluster) is an :class:`ErsUserError`. The CLI
and the spark-submit jobs print ``error: <message>`` on one line and exit with
status 2; no traceback is shown for these.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class ErsUserError(Exception):
    """A problem the user can fix; the message names what is wrong and what to do."""

    exit_code: int = EXIT_USER_ERROR


class ConfigError(ErsUserError):
    """The YAML config or a command-line override is invalid."""


class ContractError(ErsUserError):
    """A table does not match its contract (missing or mistyped columns)."""


class ModelError(ErsUserError):
    """A model file is missing, corrupt, or does not match its spec."""


class ClusteringError(ErsUserError):
    """locate-ui could not find a dominant unrecognizable-identity cluster."""
