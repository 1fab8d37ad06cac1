"""Errors that end a run with a clear one-line message.

Every error a user can fix (bad config, missing column, missing model file,
checksum mismatch, no dominant cluster) is an :class:`ErsUserError`. The CLI
and the spark-submit jobs print ``error: <message>`` on one line and exit with
status 2; no traceback is shown for these.
"""

from __future__ import annotations

import re

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


class CodecError(ErsUserError):
    """The image library on a worker lacks a codec: a broken runtime, not bad images."""


_ERROR_TYPES = {cls.__name__: cls for cls in (ErsUserError, ConfigError, ContractError, ModelError, ClusteringError,
                                                     CodecError)}
_EXECUTOR_ERROR = re.compile(r"ers_spark\.errors\.(\w+): (.+)")


def user_error_from_executor(exc: BaseException) -> ErsUserError | None:
    """The :class:`ErsUserError` an executor raised, recovered from the Spark job failure that carries it.

    A Python worker's exception reaches the driver as text (the worker's traceback inside
    a ``PythonException`` or ``Py4JJavaError``); its last ``ers_spark.errors.X: message``
    line is the job-level failure to report in one line. None for any other failure.

    Example
    -------
    >>> err = user_error_from_executor(RuntimeError("Traceback ...\\ners_spark.errors.ModelError: bad model\\n"))
    >>> type(err).__name__, str(err)
    ('ModelError', 'bad model (raised on an executor)')
    """
    matches = _EXECUTOR_ERROR.findall(str(exc))
    if not matches:
        return None
    name, message = matches[-1]
    return _ERROR_TYPES.get(name, ErsUserError)(f"{message.strip()} (raised on an executor)")


class StorageError(ErsUserError):
    """A file or the object store went away under a running job; the tables are as before it (exit 2)."""


_VANISHED_FILE = re.compile(r"(?:java\.io\.FileNotFoundException|FileNotFoundError): ([^\n]+)")  # JVM or Python reader
_STORE_DOWN = re.compile(
    r"(Connection refused|Connect to \S+ failed[^\n]*|Unable to execute HTTP request[^\n]*|UnknownHostException[^\n]*)"
)
RERUN_ADVICE = "run the stage again (each stage MERGEs on image_id: a re-run adds what is missing and nothing twice)"


def storage_error_from_job(exc: BaseException) -> StorageError | None:
    """A Spark job that failed because a file vanished or the store stopped answering, as one line.

    A failed job commits nothing (every output is one Delta commit), so the message says to re-run.

    Example
    -------
    >>> err = storage_error_from_job(RuntimeError("...\\nCaused by: java.io.FileNotFoundException: No such file: s3a://b/x.parquet\\n"))
    >>> str(err).split(";")[0]
    'a file vanished while the job read it (No such file: s3a://b/x.parquet)'
    >>> storage_error_from_job(RuntimeError("an unrelated failure")) is None
    True
    """
    text = str(exc)
    vanished = _VANISHED_FILE.search(text)
    if vanished:
        return StorageError(f"a file vanished while the job read it ({vanished.group(1).strip()[:300]}); {RERUN_ADVICE}")
    down = _STORE_DOWN.search(text)
    if down:
        return StorageError(f"the storage did not answer ({down.group(1).strip()[:300]}); once it is back, {RERUN_ADVICE}")
    return None
