"""Delta table upkeep for ``ers-spark maintain``: liquid clustering, OPTIMIZE, VACUUM, file counts.

Tables are created with liquid clustering on image_id (:func:`ers_spark.lake.tables.ensure_table`);
OPTIMIZE then rewrites their small files clustered by it (bin-packing for tables without image_id).
VACUUM deletes files no snapshot younger than the retention uses; Delta refuses a retention under the
table's ``delta.deletedFileRetentionDuration`` (168 h unless set) while
``spark.databricks.delta.retentionDurationCheck.enabled`` is on, and that is a config problem here.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from ers_spark.config import ErsConfig
from ers_spark.errors import ConfigError

log = logging.getLogger(__name__)

RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"
LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"
DELTA_MIN_RETENTION_HOURS = 168.0  # Delta's default delta.deletedFileRetentionDuration (one week)
_TOO_SHORT = "DELTA_VACUUM_RETENTION_PERIOD_TOO_SHORT"


def retention_check_enabled(spark: SparkSession, cfg: ErsConfig) -> bool:
    """Whether Delta will refuse a short VACUUM retention: the config's ``spark.conf`` value when it sets
    one (a session that was already running may not have it), else the session's."""
    value = cfg.spark.conf.get(RETENTION_CHECK) or spark.conf.get(RETENTION_CHECK, "true")
    return str(value).strip().lower() != "false"


def too_short_message(hours: float, source: str) -> str:
    """The one-line error for a VACUUM retention Delta refuses."""
    return (
        f"maintain.vacuum_retention_hours={hours:g} is below Delta's minimum retention "
        f"({DELTA_MIN_RETENTION_HOURS:g} h, delta.deletedFileRetentionDuration): a running job may still read those "
        f"files; raise it, or, when no other job uses the lake, set spark.conf \"{RETENTION_CHECK}\": \"false\" "
        f"(in {source})"
    )


def check_retention(hours: float, check_enabled: bool, source: str) -> None:
    """Refuse, before any table is touched, a retention Delta's default check would refuse."""
    if check_enabled and hours < DELTA_MIN_RETENTION_HOURS:
        raise ConfigError(too_short_message(hours, source))


@contextlib.contextmanager
def vacuum_settings(spark: SparkSession, check_enabled: bool, listing_parallelism: int) -> Iterator[None]:
    """Run VACUUMs with the retention check as decided and a listing job of ``listing_parallelism`` tasks;
    restore the session's values afterwards.

    Why the parallelism: VACUUM lists the table's folder with one task per
    ``spark.sql.sources.parallelPartitionDiscovery.parallelism`` (10,000 by default), about 30 s of empty
    tasks on two cores for a one-folder table; ers-spark's tables are unpartitioned (one folder each).
    """
    wanted = {RETENTION_CHECK: "true" if check_enabled else "false", LISTING_PARALLELISM: str(listing_parallelism)}
    previous = {key: spark.conf.get(key, None) for key in wanted}
    for key, value in wanted.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


@contextlib.contextmanager
def console_to_stderr(spark: SparkSession) -> Iterator[None]:
    """Send the JVM's Scala console (VACUUM prints "Deleted N files ...") to stderr on this thread.

    Why: stdout carries only the JSON run lines. PySpark pins each Python thread to one JVM thread, and
    Scala's ``Console.out`` is per thread, so this changes nothing else. Without the JVM (Spark Connect)
    the line stays where it was.
    """
    try:
        jvm = spark._jvm
        console_class = jvm.java.lang.Class.forName("scala.Console$")
        field = console_class.getDeclaredField("outVar")
        field.setAccessible(True)
        out_var = field.get(console_class.getField("MODULE$").get(None))
        previous = out_var.value()
        getattr(out_var, "value_$eq")(jvm.java.lang.System.err)
    except Exception:  # noqa: BLE001 - best effort: internal API
        yield
        return
    try:
        yield
    finally:
        getattr(out_var, "value_$eq")(previous)


def ensure_clustering(spark: SparkSession, path: str, columns: tuple[str, ...]) -> bool:
    """Turn liquid clustering on for a table created before ers-spark clustered tables; True when it did."""
    if not columns:
        return False
    current = DeltaTable.forPath(spark, path).detail().select("clusteringColumns").first()[0] or []
    if list(current):
        return False
    spark.sql(f"ALTER TABLE delta.`{path}` CLUSTER BY ({', '.join(f'`{c}`' for c in columns)})")
    return True


def optimize(spark: SparkSession, path: str) -> dict[str, int]:
    """OPTIMIZE the table (clusters a liquid table, compacts the others); files added and removed."""
    row = spark.sql(f"OPTIMIZE delta.`{path}`").first()
    metrics = row["metrics"] if row is not None else None
    if metrics is None:
        return {"files_added": 0, "files_removed": 0}
    return {"files_added": int(metrics["numFilesAdded"]), "files_removed": int(metrics["numFilesRemoved"])}


def vacuum(spark: SparkSession, path: str, hours: float, source: str) -> int | None:
    """VACUUM with ``hours`` of retention; the files it deleted (from its history entry; None when not logged)."""
    try:
        spark.sql(f"VACUUM delta.`{path}` RETAIN {hours:g} HOURS")
    except Exception as exc:  # noqa: BLE001 - only Delta's retention refusal is a user error
        if _TOO_SHORT not in str(exc):
            raise
        raise ConfigError(too_short_message(hours, source) + f"; refused for {path}") from None
    ends = (DeltaTable.forPath(spark, path).history(4).where(F.col("operation") == "VACUUM END")
            .orderBy(F.desc("version")).select("operationMetrics").first())
    metrics: dict[str, Any] = (ends[0] or {}) if ends is not None else {}
    return int(metrics["numDeletedFiles"]) if "numDeletedFiles" in metrics else None
