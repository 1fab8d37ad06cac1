"""Files the driver writes whole (the HTML report): a local file, or an object in a store through Hadoop.

A local path is written beside itself and renamed, so no reader sees half a page. Any other URI
(``s3a://``, ``hdfs://``, ``abfss://``) goes through the Hadoop FileSystem the session already
has, with the same credentials as the tables; an object store's PUT is whole or nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from pyspark.sql import SparkSession

from ers_spark.config import ErsConfig
from ers_spark.errors import ConfigError
from ers_spark.runtime.cluster_paths import is_local_path, report_target


def local_file(path: str) -> Path:
    """A local path or ``file:`` URI as an absolute path (``~`` expanded)."""
    plain = path.removeprefix("file://") if path.startswith("file://") else path.removeprefix("file:")
    return Path(os.path.expanduser(plain)).resolve()


def require_writable(spark: SparkSession, key: str, path: str) -> None:
    """Fail in one line, before any Spark job, when no Hadoop FileSystem serves ``path``'s scheme."""
    if is_local_path(path):
        return
    try:
        _hadoop_path(spark, path).getFileSystem(spark._jsc.hadoopConfiguration())
    except Exception as exc:  # Py4J wraps UnsupportedFileSystemException and friends
        reason = str(getattr(exc, "java_exception", exc)).splitlines()[0]
        raise ConfigError(f"{key}={path} cannot be written: {reason}") from None


def checked_report_path(spark: SparkSession, cfg: ErsConfig) -> str:
    """The report's path or URI for this session's master, checked before any table is read."""
    path = report_target(cfg, spark.sparkContext.master)
    require_writable(spark, "report.path", path)
    return path


def write_whole_text(spark: SparkSession, path: str, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all; returns where it went."""
    if is_local_path(path):
        target = local_file(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(target)
        return str(target)
    target = _hadoop_path(spark, path)
    stream = target.getFileSystem(spark._jsc.hadoopConfiguration()).create(target, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()
    return path


def read_text(spark: SparkSession, path: str) -> str:
    """What :func:`write_whole_text` wrote (tests and tools read a report back the same way)."""
    if is_local_path(path):
        return local_file(path).read_text(encoding="utf-8")
    target = _hadoop_path(spark, path)
    fs = target.getFileSystem(spark._jsc.hadoopConfiguration())
    stream = fs.open(target)
    try:
        length = fs.getFileStatus(target).getLen()
        data = spark._jvm.org.apache.commons.io.IOUtils.toByteArray(stream, length)
    finally:
        stream.close()
    return bytes(data).decode("utf-8")


def _hadoop_path(spark: SparkSession, path: str):
    return spark._jvm.org.apache.hadoop.fs.Path(path)
