"""maintain: OPTIMIZE + VACUUM every ers-spark table under ``storage.root``, the catalog kept in sync.

MERGEs and the run log leave many small files; OPTIMIZE rewrites them, clustered by image_id for the
tables that have it (Delta liquid clustering, set when a table is created; a table from an older
ers-spark is switched to it here), compacted otherwise. VACUUM then deletes the files no version
younger than ``maintain.vacuum_retention_hours`` uses (time travel to older versions ends there).
A retention Delta would refuse is one config error before any table is touched. Each table is
registered in the catalog again. One JSON run record: versions before (input) and after (output),
files before / after per table in ``runtime.tables``, totals in ``counts``.
"""

from __future__ import annotations

import logging
from typing import Any

from pyspark.sql import SparkSession

from ers_spark.config import ErsConfig
from ers_spark.errors import ContractError
from ers_spark.lake.contracts import LAKE_TABLES, RUNS, TableContract
from ers_spark.lake.maintenance import (
    check_retention, console_to_stderr, ensure_clustering, optimize, retention_check_enabled, vacuum, vacuum_settings,
)
from ers_spark.lake.tables import (
    StageRun, file_count, register_table, retry_on_conflict, table_exists, table_path, table_version,
)

STAGE_NAME = "maintain"
log = logging.getLogger(__name__)


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
