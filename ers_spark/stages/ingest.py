"""Ingest stage: a folder of images or a Parquet table of image bytes -> the crops Delta table.

A folder is listed and read on the executors (:mod:`ers_spark.distributed.listing`: no list of every
file on the driver), a Parquet table by Spark; images are decoded on the executors in Arrow batches;
the driver never holds the images. ``image_id`` is
the sha256 of the bytes, so the same bytes always get the same id and a re-run
inserts nothing (MERGE on image_id). Files that cannot be decoded go to the
quarantine table with their path and the reason; nothing is dropped silently.

Bytes stay put: Pillow decodes each input once, into byte-free probe rows kept in a
reliable checkpoint. Identity conflicts, counts and which rows are new are decided on
those rows; only the new rows get their bytes back (the source read again, joined on
the row they came from), and the bytes cross at most one exchange in the whole stage
(none when nothing is new: the bytes are then not read a second time).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import Window
from pyspark.sql import functions as F
from pyspark.sql.types import BinaryType, StringType

from ers_spark.config import ErsConfig, IngestConfig
from ers_spark.distributed.images import PROBE_SCHEMA, probe_batch
from ers_spark.distributed.listing import CONTENT, PATH, StoreSettings, list_files, read_files, read_partitions
from ers_spark.lake.contracts import (
    BYTES,
    CROPS,
    DETAIL,
    FORMAT,
    HEIGHT,
    IDENTITY,
    IMAGE_ID,
    INGESTED_AT,
    QUARANTINE,
    REASON,
    REASON_IDENTITY_CONFLICT,
    SOURCE_PATH,
    WIDTH,
    check_columns,
)
from ers_spark.runtime.cluster_paths import require_shared_paths
from ers_spark.lake.tables import (
    StageRun,
    conform,
    ensure_table,
    materialize_source,
    merge_insert_new,
    quarantine_rows,
    read_table,
    retry_on_conflict,
    table_exists,
)

log = logging.getLogger(__name__)

STAGE_NAME = "ingest"

# Which input row a probe row came from (the bytes are joined back on it): the file's path for images,
# the file and row index for Parquet (where paths may repeat or be absent).
ROW_KEY = "_row"
STATUS = "_status"
NEW, PRESENT, BAD, CONFLICT = "new", "present", "bad", "conflict"
# Bytes a keep-list row takes in a broadcast besides its strings (the id's 64 hex digits, ints, hash entry).
KEEP_ROW_OVERHEAD = 128


def _read_images(spark: SparkSession, params: IngestConfig) -> DataFrame:
    """The image files under ``input_path``, listed and read on the executors (:mod:`ers_spark.distributed.listing`)."""
    settings = StoreSettings.from_session(spark)
    files = list_files(spark, params.input_path, params.suffixes, params.recursive, settings)
    raw = read_files(files, settings, read_partitions(spark, files))
    identity = (
        F.element_at(F.split(F.col(PATH), "/"), -2) if params.identity_from_folder else F.lit(None).cast("string")
    )
    return raw.select(
        F.col(PATH).alias(ROW_KEY),
        F.col(PATH).alias(SOURCE_PATH),
        identity.alias(IDENTITY),
        F.col(CONTENT).alias(BYTES),
    )


def _read_parquet(spark: SparkSession, params: IngestConfig) -> DataFrame:
    table = spark.read.parquet(params.input_path)
    required = {params.bytes_column: BinaryType()}
    if params.path_column:
        required[params.path_column] = StringType()
    if params.identity_column:
        required[params.identity_column] = StringType()
    check_columns(
        table,
        required,
        f"parquet input {params.input_path} (set ingest.bytes_column / ingest.path_column / ingest.identity_column)",
    )
    path = F.col(params.path_column) if params.path_column else F.lit(None).cast("string")
    identity = F.col(params.identity_column) if params.identity_column else F.lit(None).cast("string")
    row = F.concat_ws("#", F.col("_metadata.file_path"), F.col("_metadata.row_index").cast("string"))
    return table.select(
        row.alias(ROW_KEY), path.alias(SOURCE_PATH), identity.alias(IDENTITY), F.col(params.bytes_column).alias(BYTES)
    )


def read_source(spark: SparkSession, params: IngestConfig) -> DataFrame:
    """The input rows (row key, source_path, identity, bytes); listed once, read by each query over it."""
    return _read_images(spark, params) if params.input_format == "images" else _read_parquet(spark, params)


def _image_id(data: Column) -> Column:
    """sha256 of the bytes, computed in the JVM (null bytes hash as empty ones)."""
    return F.sha2(F.coalesce(data, F.lit(b"").cast("binary")), 256)


def probe(source: DataFrame) -> DataFrame:
    """The byte-free probe of each input row: its image_id and Pillow's verdict, without the bytes.

    Why byte-free: everything after the probe (conflicts, counts, what is new) then moves ids, not images.
    """
    probe_udf = F.pandas_udf(probe_batch, PROBE_SCHEMA)  # type: ignore[call-overload]
    return (
        source.select(ROW_KEY, SOURCE_PATH, IDENTITY, _image_id(F.col(BYTES)).alias(IMAGE_ID),
                      probe_udf(F.col(BYTES)).alias("_probe"))
        .select("*", "_probe.*")
        .drop("_probe")
    )


def probe_once(source: DataFrame) -> DataFrame:
    """Every input row probed, computed once into a reliable checkpoint (zero-length files are listed rows too).

    Why a checkpoint: a cache evicted (or lost with an executor) would decode the images again.
    """
    return materialize_source(probe(source))


def classify(spark: SparkSession, cfg: ErsConfig, probed: DataFrame) -> DataFrame:
    """The probe rows with their status: bad (the probe's reason), conflict, new or present. No bytes.

    The same bytes under two identities is a labelling error that a MERGE on image_id would hide as
    ``already_present``. Within the input, the row with the smallest path (then row key) keeps its
    image_id; a row whose identity differs from it, or from the identity already stored for those bytes,
    is an ``identity_conflict`` (unlabelled rows never conflict). The kept row is new unless crops holds it.
    """
    first = Window.partitionBy(IMAGE_ID).orderBy(F.col(SOURCE_PATH).asc_nulls_last(), F.col(ROW_KEY))
    ranked = _with_stored(spark, cfg, (
        probed.where(F.col(REASON).isNull())
        .withColumn("_first", F.row_number().over(first) == 1)
        .withColumn("_kept_path", F.first(SOURCE_PATH).over(first))
        .withColumn("_kept_identity", F.first(IDENTITY).over(first))
    ))
    conflict = (
        F.col(IDENTITY).isNotNull() & F.col("_kept_identity").isNotNull() & (F.col(IDENTITY) != F.col("_kept_identity"))
    )
    detail = F.concat(F.lit("same bytes as "), F.col("_kept_path"), F.lit(" labelled "), F.col("_kept_identity"))
    status = F.when(conflict, CONFLICT).when(F.col("_stored"), PRESENT).when(F.col("_first"), NEW).otherwise(PRESENT)
    columns = [c for c in probed.columns if c not in (REASON, DETAIL)]
    good = ranked.select(
        *columns,
        F.when(conflict, F.lit(REASON_IDENTITY_CONFLICT)).alias(REASON),
        F.when(conflict, detail).alias(DETAIL),
        status.alias(STATUS),
    )
    bad = probed.where(F.col(REASON).isNotNull()).withColumn(STATUS, F.lit(BAD))
    return good.unionByName(bad)


def _with_stored(spark: SparkSession, cfg: ErsConfig, ranked: DataFrame) -> DataFrame:
    """``ranked`` with ``_stored`` (crops holds the image_id) and the kept path and identity taken from crops.

    Only crops' id, path and identity columns are read, never its bytes.
    """
    if not table_exists(spark, cfg, CROPS):
        return ranked.withColumn("_stored", F.lit(False))
    stored = read_table(spark, cfg, CROPS).select(
        IMAGE_ID, F.col(SOURCE_PATH).alias("_stored_path"), F.col(IDENTITY).alias("_stored_identity"),
        F.lit(True).alias("_stored"),
    ).dropDuplicates([IMAGE_ID])
    joined = ranked.join(stored, IMAGE_ID, "left").withColumn("_stored", F.coalesce(F.col("_stored"), F.lit(False)))
    return joined.withColumn(
        "_kept_path", F.when(F.col("_stored"), F.col("_stored_path")).otherwise(F.col("_kept_path"))
    ).withColumn("_kept_identity", F.when(F.col("_stored"), F.col("_stored_identity")).otherwise(F.col("_kept_identity")))


def new_crops(source: DataFrame, keep: DataFrame, broadcast: bool) -> DataFrame:
    """The new crops with their bytes: the source read again, joined to the byte-free keep-list.

    Why this shape: a small keep-list is broadcast, so no byte moves before the MERGE, whose anti-join
    with crops is the one exchange of bytes (new rows only). A keep-list too big to broadcast is
    sort-merge joined on image_id alone: the source's bytes cross that exchange, and the MERGE's join
    on image_id reuses its partitioning (only crops' ids move). The id is hashed again from the bytes
    read, so a file changed since the probe does not match (and is not written under the old id).
    """
    stream = source.select(ROW_KEY, _image_id(F.col(BYTES)).alias(IMAGE_ID), BYTES)
    kept = keep.withColumnRenamed(ROW_KEY, "_kept_row").withColumnRenamed(IMAGE_ID, "_kept_id")
    condition = (stream[IMAGE_ID] == kept["_kept_id"]) & _same(stream[ROW_KEY], kept["_kept_row"])
    joined = stream.join(F.broadcast(kept) if broadcast else kept.hint("merge"), condition)
    return joined.select(
        stream[IMAGE_ID],
        SOURCE_PATH,
        IDENTITY,
        WIDTH,
        HEIGHT,
        FORMAT,
        BYTES,
        F.current_timestamp().alias(INGESTED_AT),
    )


def _same(a: Column, b: Column) -> Column:
    """``a = b`` in a form Spark keeps as a join's residual condition rather than a second join key.

    Why: with ``spark.sql.requireAllClusterKeysForCoPartition`` (default true) a join on (image_id, row)
    hash-partitions by both, and the MERGE on image_id alone would then shuffle the bytes again.
    """
    return F.least(a, b) == F.greatest(a, b)


def byte_size(text: str) -> int:
    """A Spark size setting in bytes (``10485760b``, ``10MB``, ``-1``).

    Examples
    --------
    >>> byte_size("10485760b"), byte_size("10MB"), byte_size("-1")
    (10485760, 10485760, -1)
    """
    match = re.fullmatch(r"\s*(-?\d+)\s*([kmgtp]?)i?b?\s*", text.lower())
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * 1024 ** " kmgtp".index(match.group(2) or " ")


def broadcastable(spark: SparkSession, size: int) -> bool:
    """Whether a keep-list of ``size`` bytes is under ``spark.sql.autoBroadcastJoinThreshold`` (-1: never)."""
    limit = byte_size(spark.conf.get("spark.sql.autoBroadcastJoinThreshold", "10485760b") or "10485760b")
    return 0 <= size <= limit


@dataclass(frozen=True)
class IngestPlan:
    """What ingest writes, decided on byte-free rows; ``crops`` alone reads bytes (those of ``keep``'s rows)."""

    keep: DataFrame
    crops: DataFrame
    quarantine: DataFrame
    read: int
    new: int
    present: int
    quarantined: int
    conflicts: int


def plan_ingest(spark: SparkSession, cfg: ErsConfig) -> IngestPlan:
    """Probe the input (Pillow runs here, once per file) and build the DataFrames that ingest writes.

    Why a separate step: the physical plans of ``crops`` and ``quarantine`` can be checked for the
    exchanges that move bytes (tests/test_ingest.py) before anything is written.
    """
    params = cfg.ingest
    params.require_input(cfg.source)
    source = read_source(spark, params)
    decided = materialize_source(classify(spark, cfg, probe_once(source)))
    new = F.col(STATUS) == NEW
    keep_size = F.length(ROW_KEY) + F.coalesce(F.length(SOURCE_PATH), F.lit(0)) + F.coalesce(
        F.length(IDENTITY), F.lit(0)) + F.coalesce(F.length(FORMAT), F.lit(0)) + F.lit(KEEP_ROW_OVERHEAD)
    totals = decided.agg(
        F.count(F.lit(1)).alias("read"),
        *[F.count(F.when(F.col(STATUS) == s, 1)).alias(s) for s in (NEW, PRESENT, BAD, CONFLICT)],
        F.coalesce(F.sum(F.when(new, keep_size)), F.lit(0)).alias("keep_size"),
    ).first()
    keep = decided.where(new).select(ROW_KEY, IMAGE_ID, SOURCE_PATH, IDENTITY, WIDTH, HEIGHT, FORMAT)
    quarantined = decided.where(F.col(STATUS).isin(BAD, CONFLICT))
    return IngestPlan(
        keep=keep,
        crops=new_crops(source, keep, broadcastable(spark, int(totals["keep_size"]))),
        quarantine=quarantine_rows(quarantined, STAGE_NAME, F.col(REASON), F.col(DETAIL)),
        read=int(totals["read"]),
        new=int(totals[NEW]),
        present=int(totals[PRESENT]),
        quarantined=int(totals[BAD]) + int(totals[CONFLICT]),
        conflicts=int(totals[CONFLICT]),
    )


@dataclass
class CropsWritten:
    """What the crops MERGE did with the rows found new: inserted, matched (a concurrent ingest wrote
    the same bytes first: already present) or left out (the file changed or vanished since its probe)."""

    inserted: int
    matched: int = 0
    changed_after_probe: int = 0


def insert_crops(spark: SparkSession, cfg: ErsConfig, plan: IngestPlan) -> CropsWritten:
    """MERGE the new crops into crops; say what became of each new row.

    Why still a MERGE for rows found new: a concurrent ingest may insert the same bytes meanwhile, and
    Delta's conflict check makes the later one retry against the new snapshot, where they match (no
    duplicate). The condition is a plain equality on image_id (never null), so the MERGE's anti-join
    can reuse the source's partitioning by image_id rather than shuffle the bytes again.
    """
    if plan.new == 0:
        ensure_table(spark, cfg, CROPS)  # later stages read it; no new version
        return CropsWritten(0)
    source = conform(plan.crops, CROPS)

    def attempt() -> int:
        target = ensure_table(spark, cfg, CROPS)
        condition = f"t.`{IMAGE_ID}` = s.`{IMAGE_ID}`"
        row = target.alias("t").merge(source.alias("s"), condition).whenNotMatchedInsertAll().execute().first()
        return int(row["num_inserted_rows"]) if row is not None else 0

    inserted = retry_on_conflict(attempt, f"MERGE into {CROPS.name}")
    if inserted == plan.new:
        return CropsWritten(inserted)
    # the ids crops does not hold after the MERGE: their files changed or vanished since the probe
    lost = plan.keep.join(read_table(spark, cfg, CROPS).select(IMAGE_ID), IMAGE_ID, "left_anti").count()
    if lost:
        log.warning("ingest: %d of %d new files changed or vanished after they were probed; not written "
                    "(a later ingest reads them again)", lost, plan.new)
    return CropsWritten(inserted, matched=plan.new - inserted - lost, changed_after_probe=lost)


def run_ingest(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Run the ingest stage; its counts add up: read = written + already_present + quarantined + changed_after_probe.

    Each count is what happened to those rows (the probe's verdict, then the crops MERGE's metrics and
    what crops holds after it), not a difference of the others.
    """
    params = cfg.ingest
    params.require_input(cfg.source)
    require_shared_paths(cfg, spark.sparkContext.master, {"ingest.input_path": params.input_path})
    run = StageRun(STAGE_NAME, params={**asdict(params), "extensions": params.suffixes})
    plan = plan_ingest(spark, cfg)
    written = insert_crops(spark, cfg, plan)
    merge_insert_new(spark, cfg, QUARANTINE, plan.quarantine)
    run.counts = {
        "read": plan.read,
        "written": written.inserted,
        "already_present": plan.present + written.matched,
        "quarantined": plan.quarantined,
        "identity_conflicts": plan.conflicts,
        "changed_after_probe": written.changed_after_probe,
    }
    log.info("ingest: %d rows read, %d new crops written, %d quarantined", plan.read, written.inserted, plan.quarantined)
    return run.finish(spark, cfg, outputs=(CROPS, QUARANTINE))
