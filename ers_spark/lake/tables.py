"""Delta Lake I/O shared by every stage: create, read, MERGE on the key, versions, the run log."""

from __future__ import annotations

import json
import logging
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, TypeVar

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from ers_spark.config import ErsConfig
from ers_spark.lake.contracts import (
    CROPS, IDENTITY, IMAGE_ID, IMPORTED_SOURCES, RUNS, SOURCE_PATH, TableContract, check_contract,
)
from ers_spark.errors import ContractError

log = logging.getLogger("ers_spark")
T = TypeVar("T")


def table_path(cfg: ErsConfig, contract: TableContract) -> str:
    return cfg.storage.table_path(contract.name)


def qualified_name(cfg: ErsConfig, contract: TableContract) -> str:
    return f"{cfg.storage.database}.{contract.name}"


def _catalog_enabled(spark: SparkSession) -> bool:
    return spark.conf.get("spark.sql.catalogImplementation", "in-memory") == "hive"


def register_table(spark: SparkSession, cfg: ErsConfig, contract: TableContract) -> None:
    """Register the Delta table at its path in the catalog as ``<database>.<table>``."""
    if not _catalog_enabled(spark):
        return
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {cfg.storage.database}")
    spark.sql(
        f"CREATE TABLE IF NOT EXISTS {qualified_name(cfg, contract)} USING DELTA "
        f"LOCATION '{table_path(cfg, contract)}'"
    )


def ensure_table(
    spark: SparkSession, cfg: ErsConfig, contract: TableContract, properties: dict[str, str] | None = None
) -> DeltaTable:
    """Create the table with its contract schema when absent, register it, and return it.

    A new table with an image_id column is created with Delta liquid clustering on it, so OPTIMIZE
    (``ers-spark maintain``) lays files out by image_id and lookups by id skip files.
    """
    path = table_path(cfg, contract)
    if not DeltaTable.isDeltaTable(spark, path):
        builder = DeltaTable.createIfNotExists(spark).location(path).addColumns(contract.schema)
        if contract.cluster_by:
            builder = builder.clusterBy(*contract.cluster_by)
        builder = builder.property("ers.contract", contract.name)
        for key, value in (properties or {}).items():
            builder = builder.property(key, value)
        builder.execute()
    else:
        add_missing_columns(spark, path, contract)
        if properties:
            set_properties(spark, cfg, contract, properties)
    register_table(spark, cfg, contract)
    return DeltaTable.forPath(spark, path)


def add_missing_columns(spark: SparkSession, path: str, contract: TableContract) -> None:
    """Bring a table written by an older ers-spark up to its contract: add the nullable columns it lacks."""
    present = {f.name for f in spark.read.format("delta").load(path).schema.fields}
    missing = [f for f in contract.schema.fields if f.name not in present]
    if not missing:
        return
    required = [f.name for f in missing if not f.nullable]
    if required:
        raise ContractError(f"table '{contract.name}' at {path} lacks required columns {', '.join(required)}")
    columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
    spark.sql(f"ALTER TABLE delta.`{path}` ADD COLUMNS ({columns})")


def set_properties(spark: SparkSession, cfg: ErsConfig, contract: TableContract, properties: dict[str, str]) -> None:
    """Set table properties (model and UIC versions) on an existing table; no new version when unchanged."""
    current = table_properties(spark, table_path(cfg, contract), properties)
    properties = {k: v for k, v in properties.items() if current[k] != v}
    if not properties:
        return
    assignments = ", ".join(f"'{k}' = '{v}'" for k, v in properties.items())
    spark.sql(f"ALTER TABLE delta.`{table_path(cfg, contract)}` SET TBLPROPERTIES ({assignments})")


def quarantine_rows(
    df: DataFrame,
    stage: str,
    reason: "F.Column",
    detail: "F.Column",
    ers: "F.Column | None" = None,
    uic_id: "F.Column | None" = None,
    model_version: "F.Column | None" = None,
) -> DataFrame:
    """Rows for the quarantine table from ``df`` (which has image_id and source_path)."""
    from ers_spark.lake.contracts import (
        DETAIL, ERS, IMAGE_ID, MODEL_VERSION, QUARANTINED_AT, REASON, SOURCE_PATH, STAGE, UIC_ID,
    )

    return df.select(
        IMAGE_ID,
        SOURCE_PATH,
        F.lit(stage).alias(STAGE),
        reason.alias(REASON),
        detail.alias(DETAIL),
        (ers if ers is not None else F.lit(None)).cast("double").alias(ERS),
        (uic_id if uic_id is not None else F.lit(None)).cast("string").alias(UIC_ID),
        (model_version if model_version is not None else F.lit(None)).cast("string").alias(MODEL_VERSION),
        F.current_timestamp().alias(QUARANTINED_AT),
    )


def table_exists(spark: SparkSession, cfg: ErsConfig, contract: TableContract) -> bool:
    return DeltaTable.isDeltaTable(spark, table_path(cfg, contract))


def read_table(spark: SparkSession, cfg: ErsConfig, contract: TableContract, hint: str = "") -> DataFrame:
    """Read a stage's input table and check it against its contract."""
    path = table_path(cfg, contract)
    if not DeltaTable.isDeltaTable(spark, path):
        run_hint = f"; {hint}" if hint else ""
        raise ContractError(f"input table '{contract.name}' not found at {path}{run_hint}")
    df = spark.read.format("delta").load(path)
    check_contract(df, contract, f"input table '{contract.name}' at {path}")
    return df


def image_labels(spark: SparkSession, cfg: ErsConfig) -> DataFrame:
    """(image_id, source_path, identity) of every image the lake knows, one row per id (empty when none).

    Why one helper: ingested images carry these in ``crops`` (only these three columns are scanned,
    never the bytes), imported vectors in ``imported_sources``; score, clean, evaluate and report read
    labels here, so they run on a lake without images. Where both tables hold an id, crops win.
    """
    columns = [IMAGE_ID, SOURCE_PATH, IDENTITY]
    parts = [read_table(spark, cfg, c).select(*columns) for c in (CROPS, IMPORTED_SOURCES) if table_exists(spark, cfg, c)]
    if not parts:
        return spark.createDataFrame([], f"{IMAGE_ID} string, {SOURCE_PATH} string, {IDENTITY} string")
    if len(parts) == 1:
        return parts[0]
    crops, imported = parts
    return crops.unionByName(imported.join(crops.select(IMAGE_ID), IMAGE_ID, "left_anti"))


def _delta_snapshot(spark: SparkSession, path: str) -> Any | None:
    """The table's latest snapshot from Delta's JVM ``DeltaLog``, or None when that API is not reachable.

    Reading the version or the properties this way replays only the Delta log (milliseconds);
    ``history(1)`` and ``detail()`` each run a Spark job (about half a second on a small
    machine), and every stage asks for several versions.
    """
    try:
        jvm = spark._jvm  # absent on Spark Connect
        log = jvm.org.apache.spark.sql.delta.DeltaLog.forTable(spark._jsparkSession, path)
        none = jvm.scala.Option.empty()
        return log.update(False, none, none)
    except Exception:  # noqa: BLE001 - internal API: fall back to the public, slower one
        return None


def table_version(spark: SparkSession, cfg: ErsConfig, contract: TableContract) -> int | None:
    """The latest Delta version of a table, or None when it does not exist."""
    path = table_path(cfg, contract)
    snapshot = _delta_snapshot(spark, path)
    if snapshot is not None:
        version = int(snapshot.version())
        return version if version >= 0 else None
    if not DeltaTable.isDeltaTable(spark, path):
        return None
    row = DeltaTable.forPath(spark, path).history(1).select("version").first()
    return int(row[0]) if row is not None else None


def file_count(spark: SparkSession, path: str) -> int:
    """Data files in the table's latest snapshot (from the Delta log when reachable)."""
    snapshot = _delta_snapshot(spark, path)
    if snapshot is not None:
        return int(snapshot.numOfFiles())
    return int(DeltaTable.forPath(spark, path).detail().select("numFiles").first()[0])


def table_properties(spark: SparkSession, path: str, keys: Iterable[str]) -> dict[str, str | None]:
    """Current values of some table properties (None when unset)."""
    snapshot = _delta_snapshot(spark, path)
    if snapshot is not None:
        configuration = snapshot.metadata().configuration()
        values: dict[str, str | None] = {}
        for key in keys:
            option = configuration.get(key)
            values[key] = str(option.get()) if option.isDefined() else None
        return values
    current = DeltaTable.forPath(spark, path).detail().select("properties").first()[0] or {}
    return {key: current.get(key) for key in keys}


def _merge_condition(contract: TableContract) -> str:
    return " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in contract.key)


def conform(df: DataFrame, contract: TableContract) -> DataFrame:
    """Select ``df``'s contract columns in order, casting those whose type differs (nullability aside)."""
    from ers_spark.lake.contracts import same_type

    actual = {f.name: f.dataType for f in df.schema.fields}
    return df.select(
        [
            F.col(f.name) if same_type(actual[f.name], f.dataType) else F.col(f.name).cast(f.dataType).alias(f.name)
            for f in contract.schema.fields
        ]
    )


WRITE_CONFLICT_RETRIES = 8


# A concurrent writer creating the same table: its files are there before its first commit.
_CONCURRENT_CREATE = "DELTA_CREATE_TABLE_WITH_NON_EMPTY_LOCATION"


# Delta's conflict exceptions, matched by name: delta's Python package may be loaded twice (site-packages
# and the jar Spark puts on sys.path), and ProtocolChangedException does not derive from the base in Python.
_CONFLICTS = {
    "DeltaConcurrentModificationException", "ConcurrentAppendException", "ConcurrentWriteException",
    "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException", "ConcurrentTransactionException",
    "MetadataChangedException", "ProtocolChangedException",
}


def is_write_conflict(exc: BaseException) -> bool:
    """A Delta optimistic-concurrency conflict, or another job creating the same table right now."""
    return any(cls.__name__ in _CONFLICTS for cls in type(exc).__mro__) or _CONCURRENT_CREATE in str(exc)


def retry_on_conflict(write: Callable[[], T], what: str, retries: int = WRITE_CONFLICT_RETRIES) -> T:
    """Run a Delta write again when a concurrent writer committed first (optimistic concurrency).

    Every write here is a MERGE on the table's key, so re-running it against the new
    snapshot is correct: rows the other writer inserted are simply matched.
    """
    for attempt in range(retries + 1):
        try:
            return write()
        except Exception as exc:  # noqa: BLE001 - only write conflicts are retried, the rest re-raised
            if attempt == retries or not is_write_conflict(exc):
                raise
            delay = min(8.0, 0.25 * 2**attempt) * (0.5 + random.random())
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            log.warning("%s: concurrent write (%s); retry %d of %d in %.1f s", what, first, attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def with_retired_columns(source: DataFrame, target_schema: StructType) -> DataFrame:
    """``source`` with a null for each column the table holds but its contract no longer has.

    A table written by an older ers-spark keeps columns this version stopped writing (crops'
    ``parent_image_id`` and ``face_index``, from when alignment wrote chips as crops); Delta's
    ``INSERT *`` needs every one of them in the source.
    """
    present = set(source.columns)
    retired = [f for f in target_schema.fields if f.name not in present]
    return source.select("*", *[F.lit(None).cast(f.dataType).alias(f.name) for f in retired]) if retired else source


def merge_insert_new(spark: SparkSession, cfg: ErsConfig, contract: TableContract, df: DataFrame) -> int:
    """Insert the rows whose key is not in the table yet; return how many were inserted.

    Duplicate keys inside ``df`` are collapsed first (MERGE would insert both). Delta reads an
    insert-only MERGE's source once (one anti-join, no materialisation; tests/test_merge.py counts it),
    so ``df`` is not copied: crops' image bytes pass through once. Only a conflict retry reads it again.
    """
    source = conform(df, contract).dropDuplicates(list(contract.key))

    def attempt() -> int:
        target = ensure_table(spark, cfg, contract)
        rows = with_retired_columns(source, target.toDF().schema)
        merge = target.alias("t").merge(rows.alias("s"), _merge_condition(contract)).whenNotMatchedInsertAll()
        return _inserted(merge.execute())

    return retry_on_conflict(attempt, f"MERGE into {contract.name}")


def merge_sync(
    spark: SparkSession,
    cfg: ErsConfig,
    contract: TableContract,
    df: DataFrame,
    compare: tuple[str, ...],
    delete_scope: str | None = None,
) -> dict[str, int]:
    """Make the table agree with ``df`` on its key, touching only rows that change.

    New keys are inserted; existing keys are updated only when one of the
    ``compare`` columns differs (so a re-run with the same inputs writes
    nothing); with ``delete_scope`` (a SQL condition on the target ``t``), target
    rows in that scope whose key is absent from ``df`` are deleted.
    Returns inserted / updated / deleted counts. A concurrent writer's commit makes it run again.
    ``df`` is evaluated once (see :func:`materialize_source`), whatever the checks and retries.
    """
    source = materialize_source(conform(df, contract).dropDuplicates(list(contract.key)))
    return retry_on_conflict(
        lambda: _merge_sync_once(spark, cfg, contract, source, compare, delete_scope), f"MERGE into {contract.name}"
    )


def materialize_source(df: DataFrame) -> DataFrame:
    """``df`` computed once into a reliable checkpoint in ``spark.checkpoint_dir``, as a DataFrame over those files.

    Why: the no-op check reads the source, Delta's MERGE reads it again and so does a conflict retry;
    a source with a Python UDF or a shuffle behind it would run each time. A cache spares that only while
    its blocks last (evicted, or lost with an executor, the plan runs again); a reliable checkpoint is
    read back from files whatever happens (a local one is lost with its executor), and Spark's cleaner
    deletes them once the DataFrame is gone (``spark.cleaner.referenceTracking.cleanCheckpoints``).
    The price: the source is written once to the checkpoint dir (merge_sync's sources hold no image bytes).
    """
    return df.checkpoint(eager=True)


def _merge_sync_once(
    spark: SparkSession,
    cfg: ErsConfig,
    contract: TableContract,
    source: DataFrame,
    compare: tuple[str, ...],
    delete_scope: str | None,
) -> dict[str, int]:
    """One MERGE attempt of :func:`merge_sync` against the table's current snapshot (``source`` is conformed)."""
    target = ensure_table(spark, cfg, contract)
    current = target.toDF()
    # skip the MERGE entirely when nothing would change: Delta commits a version even for a no-op MERGE
    same = [source[c].eqNullSafe(current[c]) for c in (*contract.key, *compare)]
    pending = source.join(current, on=_and_all(same), how="left_anti")
    stale_exists = False
    if delete_scope is not None:
        in_source = [current[c].eqNullSafe(source[c]) for c in contract.key]
        stale_exists = not current.where(delete_scope.replace("t.", "")).join(
            source, on=_and_all(in_source), how="left_anti"
        ).isEmpty()
    if pending.isEmpty() and not stale_exists:
        return {"inserted": 0, "updated": 0, "deleted": 0}
    changed = " OR ".join(f"NOT (t.`{c}` <=> s.`{c}`)" for c in compare)
    builder = (
        target.alias("t")
        .merge((source if delete_scope is not None else pending).alias("s"), _merge_condition(contract))
        .whenMatchedUpdateAll(condition=changed)
        .whenNotMatchedInsertAll()
    )
    if delete_scope is not None:
        builder = builder.whenNotMatchedBySourceDelete(condition=delete_scope)
    metrics = builder.execute()
    row = metrics.first() if metrics is not None else None
    if row is None:
        return {"inserted": 0, "updated": 0, "deleted": 0}
    return {
        "inserted": int(row["num_inserted_rows"]),
        "updated": int(row["num_updated_rows"]),
        "deleted": int(row["num_deleted_rows"]),
    }


def _and_all(conditions: list) -> "F.Column":
    combined = conditions[0]
    for condition in conditions[1:]:
        combined = combined & condition
    return combined


def of_model(model: tuple[str, str]) -> Column:
    """Rows of one (model_name, model_version): embedding spaces of two models never mix."""
    from ers_spark.lake.contracts import MODEL_NAME, MODEL_VERSION

    return (F.col(MODEL_NAME) == model[0]) & (F.col(MODEL_VERSION) == model[1])


def latest_model(df: DataFrame, time_column: str = "embedded_at") -> tuple[str, str, list[dict[str, Any]]]:
    """The (model_name, model_version) with the most recent ``time_column``, plus every model seen.

    A table may hold rows of several models; mixing embedding spaces is
    meaningless, so stages work on the latest model only.
    """
    from ers_spark.lake.contracts import MODEL_NAME, MODEL_VERSION

    models = (
        df.groupBy(MODEL_NAME, MODEL_VERSION)
        .agg(F.max(time_column).alias("latest"), F.count(F.lit(1)).alias("rows"))
        .orderBy(F.desc("latest"), MODEL_NAME, MODEL_VERSION)
        .collect()
    )
    if not models:
        raise ContractError("the input table is empty: run the previous stage on a non-empty table first")
    seen = [
        {"model_name": r[MODEL_NAME], "model_version": r[MODEL_VERSION], "rows": int(r["rows"]), "latest": str(r["latest"])}
        for r in models
    ]
    return models[0][MODEL_NAME], models[0][MODEL_VERSION], seen


def _inserted(metrics: DataFrame | None) -> int:
    row = metrics.first() if metrics is not None else None
    return int(row["num_inserted_rows"]) if row is not None else 0


def settings_json(settings: dict[str, Any]) -> str:
    """The settings an artefact (a UIC, a gamma) was made with, as stored next to it."""
    return json.dumps(settings, sort_keys=True, default=str)


def changed_settings(stored: str | None, current: dict[str, Any]) -> list[str]:
    """Keys whose value differs between the stored settings and the current ones (all keys when none stored).

    Examples
    --------
    >>> changed_settings('{"eps": 0.3, "seed": 0}', {"eps": 0.4, "seed": 0})
    ['eps']
    >>> changed_settings(None, {"target_far": 0.01})
    ['target_far']
    """
    if stored is None:
        return sorted(current)
    before = json.loads(stored)
    now = json.loads(settings_json(current))
    return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))


def append(spark: SparkSession, cfg: ErsConfig, contract: TableContract, df: DataFrame) -> None:
    """Blind append (the run log); only the table's creation can meet a concurrent writer."""

    def attempt() -> None:
        ensure_table(spark, cfg, contract)
        conform(df, contract).write.format("delta").mode("append").save(table_path(cfg, contract))

    retry_on_conflict(attempt, f"append to {contract.name}")


@dataclass
class StageRun:
    """Times one stage run, then logs one JSON line and appends it to the ``runs`` table.

    Examples
    --------
    >>> run = StageRun("ingest", params={"input_path": "/faces"})   # doctest: +SKIP
    >>> run.counts.update(read=50, written=45, already_present=0, quarantined=5)  # doctest: +SKIP
    >>> run.finish(spark, cfg)   # doctest: +SKIP
    """

    stage: str
    params: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)
    input_versions: dict[str, int | None] = field(default_factory=dict)
    output_versions: dict[str, int | None] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    _t0: float = field(default_factory=time.perf_counter)

    def record(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "run_id": self.run_id,
            "params": self.params,
            "input_versions": self.input_versions,
            "output_versions": self.output_versions,
            "counts": self.counts,
            **({"runtime": self.runtime} if self.runtime else {}),
            "seconds": round(time.perf_counter() - self._t0, 3),
        }

    def finish(self, spark: SparkSession, cfg: ErsConfig, outputs: tuple[TableContract, ...] = ()) -> dict[str, Any]:
        """Read the output versions, print the JSON line, and store it in the runs table."""
        for contract in outputs:
            self.output_versions[contract.name] = table_version(spark, cfg, contract)
        record = self.record()
        print(json.dumps(record, sort_keys=True, default=str), file=sys.stdout, flush=True)
        row = {
            "run_id": self.run_id,
            "stage": self.stage,
            "params": json.dumps(self.params, sort_keys=True, default=str),
            "input_versions": {k: v for k, v in self.input_versions.items()},
            "output_versions": {k: v for k, v in self.output_versions.items()},
            "counts": {k: int(v) for k, v in self.counts.items()},
            "seconds": float(record["seconds"]),
            "started_at": self.started_at.replace(tzinfo=None),
            "runtime": json.dumps(self.runtime, sort_keys=True) if self.runtime else None,
        }
        append(spark, cfg, RUNS, spark.createDataFrame([row], RUNS.schema))
        return record
