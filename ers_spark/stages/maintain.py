"""maintain: OPTIMIZE + VACUUM every ers-spark table under ``storage.root``, the catalog kept in sync.

MERGEs and the run log leave many small files; OPTIMIZE rewrites them, clustered by image_id for the
tables that have it (Delta liquid clustering, set when a table is created; a table from an older
ers-spark is switched to it here), compacted otherwise. VACUUM then deletes the files no version
younger than ``maintain.vacuum_retention_hours`` uses (time travel to older versions ends there).
A retention Delta would refuse is one config error before any table is touched. Each table is
registered in the catalog again. One JSON run record: versions before (input) and after (output),
files before / after per table in ``runtime.tables``, totals in ``counts``.

Delta refuses a VACUUM retention under the table's ``delta.deletedFileRetentionDuration`` (168 h unless
set) while ``spark.databricks.delta.retentionDurationCheck.enabled`` is on; that is a config problem here.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from ers_spark.config import ErsConfig
from ers_spark.errors import ConfigError, ContractError
from ers_spark.lake.contracts import LAKE_TABLES, RUNS, TableContract
from ers_spark.lake.tables import (
    StageRun, file_count, register_table, retry_on_conflict, table_exists, table_path, table_version,
)

STAGE_NAME = "maintain"
log = logging.getLogger(__name__)

RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"
LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"
DELTA_MIN_RETENTION_HOURS = 168.0  # Delta's default delta.deletedFileRetentionDuration (one week)
_TOO_SHORT = "DELTA_VACUUM_RETENTION_PERIOD_TOO_SHORT"


# --------------------------------------------------------------------------- Delta upkeep of one table


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


# --------------------------------------------------------------------------- the stage


def tables_to_maintain(spark: SparkSession, cfg: ErsConfig) -> list[TableContract]:
    """Every ers-spark table that exists, the run log last (this run appends to it); an error when none does."""
    present = [c for c in LAKE_TABLES.values() if table_exists(spark, cfg, c)]
    if not present:
        raise ContractError(f"no ers-spark table under {cfg.storage.table_path('')}: nothing to maintain "
                            "(check storage.root)")
    return sorted(present, key=lambda c: c.name == RUNS.name)


def maintain_table(spark: SparkSession, cfg: ErsConfig, contract: TableContract) -> dict[str, Any]:
    """Cluster (when not yet), OPTIMIZE, VACUUM and register one table; its files and versions before and after."""
    path = table_path(cfg, contract)
    detail: dict[str, Any] = {"version_before": table_version(spark, cfg, contract),
                              "files_before": file_count(spark, path)}
    detail["clustering_enabled"] = retry_on_conflict(
        lambda: ensure_clustering(spark, path, contract.cluster_by), f"CLUSTER BY on {contract.name}")
    detail.update(retry_on_conflict(lambda: optimize(spark, path), f"OPTIMIZE {contract.name}"))
    detail["files_after"] = file_count(spark, path)
    detail["files_vacuumed"] = vacuum(spark, path, cfg.maintain.vacuum_retention_hours, cfg.source)
    detail["version_after"] = table_version(spark, cfg, contract)
    detail["clustered_by"] = list(contract.cluster_by)
    register_table(spark, cfg, contract)
    log.info("maintain: %s: %d -> %d files, %s deleted by VACUUM", contract.name, detail["files_before"],
             detail["files_after"], detail["files_vacuumed"])
    return detail


def run_maintain(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Run maintain; counts: tables, files before / after OPTIMIZE (all tables), files VACUUM deleted."""
    hours = cfg.maintain.vacuum_retention_hours
    check_enabled = retention_check_enabled(spark, cfg)
    check_retention(hours, check_enabled, cfg.source)
    tables = tables_to_maintain(spark, cfg)
    run = StageRun(STAGE_NAME, params={"vacuum_retention_hours": hours, "retention_check": check_enabled})
    with vacuum_settings(spark, check_enabled, cfg.spark.shuffle_partitions), console_to_stderr(spark):
        details = {c.name: maintain_table(spark, cfg, c) for c in tables}
    run.input_versions = {name: d["version_before"] for name, d in details.items()}
    run.runtime = {"tables": details}
    run.counts = {
        "tables": len(details),
        "files_before": sum(d["files_before"] for d in details.values()),
        "files_after": sum(d["files_after"] for d in details.values()),
        "files_vacuumed": sum(d["files_vacuumed"] or 0 for d in details.values()),
        "clustering_enabled": sum(int(d["clustering_enabled"]) for d in details.values()),
    }
    return run.finish(spark, cfg, outputs=tuple(tables))
