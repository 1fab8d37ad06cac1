"""What ers-spark prints while it runs: Python logging, the JVM's log4j2 config, Ivy's output.

Quiet by default: the driver JVM logs through ``conf/log4j2-quiet.properties`` (no Hive SerDe
or metastore WARN lines on every table) and the dependency-resolution report that Ivy prints
while the JVM starts (``spark.jars.packages``: hundreds of "found ..."/"downloading ..." lines
and, where repos.spark-packages.org is unreachable, "Host ... not found" and "You probably access
the destination server through a proxy server ..." lines) is hidden. ``ers-spark --verbose``
(:func:`configure_logging` with ``verbose=True``) brings both back and logs at DEBUG.

No pyspark import here: the command line configures logging before any JVM exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

QUIET_LOG4J = Path(__file__).resolve().parents[1] / "conf" / "log4j2-quiet.properties"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_verbose = False


def configure_logging(verbose: bool = False) -> None:
    """Set up Python logging once per process (INFO, DEBUG with ``verbose``) and remember the choice.

    Log lines go to stderr; the JSON run lines stay alone on stdout. Only ``ers_spark.*``
    loggers are raised to INFO/DEBUG; py4j and other libraries stay at WARNING.
    """
    global _verbose
    _verbose = verbose
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    logging.getLogger("ers_spark").setLevel(logging.DEBUG if verbose else logging.INFO)


def is_verbose() -> bool:
    return _verbose


def quiet_java_option() -> str:
    """The driver JVM option that applies the quiet log4j2 config (quoted when the path has spaces)."""
    option = f"-Dlog4j2.configurationFile={QUIET_LOG4J}"
    return f'"{option}"' if " " in option else option


def add_java_option(existing: str | None, option: str) -> str:
    """Append ``option`` to a ``spark.driver.extraJavaOptions`` value without losing what is there."""
    return f"{existing} {option}".strip() if existing else option


def packages_cached(packages: str, ivy_dir: str | None) -> bool:
    """Whether Ivy has already retrieved every ``group:artifact:version`` jar (so no download happens)."""
    jars = Path(os.path.expanduser(ivy_dir or "~/.ivy2.5.2")) / "jars"
    for coordinate in filter(None, (p.strip() for p in packages.split(","))):
        parts = coordinate.split(":")
        if len(parts) != 3 or not (jars / f"{parts[0]}_{parts[1]}-{parts[2]}.jar").is_file():
            return False
    return True


# Ivy's resolution report runs from its first line to "N artifacts copied, M already retrieved".
_IVY_START = re.compile(rb"^(:: loading settings ::|Ivy Default Cache set to:|The jars for the packages stored in:)")
_IVY_END = re.compile(rb"^\s*\d+ artifacts copied, \d+ already retrieved")
_JVM_NOISE = re.compile(rb"^WARNING: Using incubator modules: jdk\.incubator\.vector")


class _LaunchFilter(threading.Thread):
    """Forwards the JVM's stderr to the real one, holding back Ivy's report while the JVM starts."""

    def __init__(self, read_fd: int, out_fd: int) -> None:
        super().__init__(name="ers-spark-jvm-stderr", daemon=True)
        self.read_fd, self.out_fd = read_fd, out_fd
        self.hidden: list[bytes] = []
        self._launching = True
        self._in_ivy = False
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            with os.fdopen(self.read_fd, "rb") as source:
                for line in source:
                    with self._lock:
                        if self._launching and self._noise(line):
                            self.hidden.append(line)
                            continue
                    self._write(line)
        finally:
            os.close(self.out_fd)

    def _noise(self, line: bytes) -> bool:
        if self._in_ivy:
            self._in_ivy = not _IVY_END.match(line)
            return True
        if _IVY_START.match(line):
            self._in_ivy = True
            return True
        return bool(_JVM_NOISE.match(line))

    def _write(self, data: bytes) -> None:
        try:
            os.write(self.out_fd, data)
        except OSError:
            pass

    def launched(self, ok: bool) -> int:
        """Stop filtering; when the launch failed, show what was held back (it says why). Returns lines hidden."""
        with self._lock:
            self._launching = False
            hidden, self.hidden = self.hidden, []
            if not ok:
                for line in hidden:
                    self._write(line)
        return len(hidden)


@contextlib.contextmanager
def hidden_ivy_output(enabled: bool = True, spark_cfg: Any = None) -> Iterator[None]:
    """While a SparkSession starts its JVM inside this block, hide Ivy's resolution report from stderr.

    PySpark launches the JVM with this process's stderr; for the block, fd 2 is a pipe through
    a filter thread, which keeps forwarding everything else for the JVM's lifetime. On a
    failed launch the hidden lines are printed after all. No-op unless ``enabled`` on POSIX.
    ``spark_cfg`` (the config's ``spark`` section) names the packages: when Ivy has not
    retrieved them yet, one line says that the first run downloads them.
    """
    launching = "PYSPARK_GATEWAY_PORT" not in os.environ  # under spark-submit the JVM (and Ivy) already ran
    packages = ",".join(spark_cfg.packages) if spark_cfg is not None and not spark_cfg.jars_dir and launching else ""
    if packages and not packages_cached(packages, (spark_cfg.conf or {}).get("spark.jars.ivy")):
        log.info("starting Spark: Ivy downloads %s and its dependencies from Maven Central (first run only)", packages)
    if not enabled or os.name != "posix":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    filt = _LaunchFilter(read_fd, saved)
    filt.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # Python's stderr is the real one again; the JVM keeps writing into the pipe
        hidden = filt.launched(ok)
        if ok and hidden:
            log.debug("hid %d lines of Ivy output while the JVM started (--verbose shows them)", hidden)
