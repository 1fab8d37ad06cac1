"""Ingest stage: a folder of images or a Parquet table of image bytes -> the crops Delta table.

Files are listed and read by Spark's ``binaryFile`` source and decoded on the
executors in Arrow batches; the driver never holds the images. ``image_id`` is
the sha256 of the bytes, so the same bytes always get the same id and a re-run
inserts nothing (MERGE on image_id). Files that cannot be decoded go to the
quarantine table with their path and the reason; nothing is dropped silently.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import Window
from pyspark.sql import functions as F
from pyspark.sql.types import BinaryType, IntegerType, StringType, StructField, StructType

from ers_spark.config import ErsConfig, IngestConfig
from ers_spark.lake.contracts import (
    BYTES,
    CROPS,
    DETAIL,
    FACE_INDEX,
    FORMAT,
    HEIGHT,
    IDENTITY,
    IMAGE_ID,
    INGESTED_AT,
    PARENT_IMAGE_ID,
    QUARANTINE,
    REASON,
    REASON_EMPTY,
    REASON_IDENTITY_CONFLICT,
    REASON_UNDECODABLE,
    SOURCE_PATH,
    WIDTH,
    check_columns,
)
from ers_spark.lake.tables import StageRun, merge_insert_new, quarantine_rows, read_table, table_exists

STAGE_NAME = "ingest"

PROBE_SCHEMA = StructType(
    [
        StructField(WIDTH, IntegerType(), True),
        StructField(HEIGHT, IntegerType(), True),
        StructField(FORMAT, StringType(), True),
        StructField(REASON, StringType(), True),
        StructField(DETAIL, StringType(), True),
    ]
)


def probe_image(data: bytes | None) -> tuple[int | None, int | None, str | None, str | None, str | None]:
    """Fully decode one image; return (width, height, format, reason, detail).

    A full ``load()`` (not just the header) is what catches truncated files.
    """
    from PIL import Image, UnidentifiedImageError

    if data is None or len(data) == 0:
        return None, None, None, REASON_EMPTY, "file has 0 bytes"
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "unknown").lower()
            img.load()
            width, height = img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        return None, None, None, REASON_UNDECODABLE, detail
    if fmt == "ppm":  # Pillow names PGM/PPM/PBM files "PPM"
        fmt = "pnm"
    return width, height, fmt, None, None


def probe_batch(images: pd.Series) -> pd.DataFrame:
    """Probe a batch of image bytes (one Arrow batch on an executor)."""
    rows = [probe_image(b) for b in images]
    out = pd.DataFrame(rows, columns=[WIDTH, HEIGHT, FORMAT, REASON, DETAIL])
    out[WIDTH] = out[WIDTH].astype("Int32")
    out[HEIGHT] = out[HEIGHT].astype("Int32")
    return out


@dataclass(frozen=True)
class IngestParams:
    """Everything the ingest stage needs, validated before Spark reads anything."""

    input_path: str
    input_format: str
    extensions: tuple[str, ...]
    recursive: bool
    identity_from_folder: bool
    bytes_column: str
    path_column: str | None
    identity_column: str | None

    @classmethod
    def from_config(cls, cfg: ErsConfig) -> "IngestParams":
        ing: IngestConfig = cfg.ingest
        return cls(
            input_path=ing.require_input(cfg.source),
            input_format=ing.input_format,
            extensions=tuple(e.lower().lstrip(".") for e in ing.extensions),
            recursive=ing.recursive,
            identity_from_folder=ing.identity_from_folder,
            bytes_column=ing.bytes_column,
            path_column=ing.path_column,
            identity_column=ing.identity_column,
        )

    def path_glob(self) -> str:
        """One Hadoop glob matching every extension in either case, e.g. ``*.{jpg,JPG,png,PNG}``."""
        variants = sorted({v for e in self.extensions for v in (e.lower(), e.upper())})
        return "*.{" + ",".join(variants) + "}"


def _read_images(spark: SparkSession, params: IngestParams) -> DataFrame:
    raw = (
        spark.read.format("binaryFile")
        .option("pathGlobFilter", params.path_glob())
        .option("recursiveFileLookup", str(params.recursive).lower())
        .load(params.input_path)
    )
    identity = (
        F.element_at(F.split(F.col("path"), "/"), -2) if params.identity_from_folder else F.lit(None).cast("string")
    )
    return raw.select(
        F.col("path").alias(SOURCE_PATH),
        identity.alias(IDENTITY),
        F.col("content").alias(BYTES),
    )


def _read_parquet(spark: SparkSession, params: IngestParams) -> DataFrame:
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
    return table.select(path.alias(SOURCE_PATH), identity.alias(IDENTITY), F.col(params.bytes_column).alias(BYTES))


def probe(df: DataFrame) -> DataFrame:
    """Add image_id (sha256 of the bytes, computed in the JVM) and the decode probe columns."""
    probe_udf = F.pandas_udf(probe_batch, PROBE_SCHEMA)  # type: ignore[call-overload]
    return (
        df.withColumn(IMAGE_ID, F.sha2(F.coalesce(F.col(BYTES), F.lit(b"").cast("binary")), 256))
        .withColumn("_probe", probe_udf(F.col(BYTES)))
        .select("*", "_probe.*")
        .drop("_probe")
    )


def _empty_files(spark: SparkSession, listed: list[str], probed: DataFrame) -> DataFrame:
    """Files that were listed but never scanned: Spark's file scan skips zero-length files (SPARK-26161)."""
    listed_df = spark.createDataFrame([(p,) for p in listed], f"{SOURCE_PATH} string").select(
        F.regexp_replace(SOURCE_PATH, "^file:///", "file:/").alias(SOURCE_PATH)
    )
    return listed_df.join(probed.select(SOURCE_PATH), SOURCE_PATH, "left_anti").select(
        F.sha2(F.lit(b"").cast("binary"), 256).alias(IMAGE_ID),
        SOURCE_PATH,
        F.lit(None).cast("string").alias(IDENTITY),
        F.lit(None).cast("binary").alias(BYTES),
        F.lit(None).cast("int").alias(WIDTH),
        F.lit(None).cast("int").alias(HEIGHT),
        F.lit(None).cast("string").alias(FORMAT),
        F.lit(REASON_EMPTY).alias(REASON),
        F.lit("file has 0 bytes").alias(DETAIL),
    )


def split_identity_conflicts(spark: SparkSession, cfg: ErsConfig, good: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(crops to MERGE, identity conflicts to quarantine) from the decodable input rows.

    The same bytes under two identities is a labelling error that a MERGE on image_id would
    hide as ``already_present``. Within the input, the row with the smallest path keeps its
    image_id; a row whose identity differs from it, or from the identity already stored for
    those bytes, goes to quarantine as ``identity_conflict`` (unlabelled rows never conflict).
    """
    first = Window.partitionBy(IMAGE_ID).orderBy(F.col(SOURCE_PATH).asc_nulls_last())
    ranked = good.withColumn("_kept_path", F.first(SOURCE_PATH).over(first)).withColumn(
        "_kept_identity", F.first(IDENTITY, ignorenulls=False).over(first)
    )
    if table_exists(spark, cfg, CROPS):
        stored = read_table(spark, cfg, CROPS).where(F.col(PARENT_IMAGE_ID).isNull()).select(
            IMAGE_ID, F.col(SOURCE_PATH).alias("_stored_path"), F.col(IDENTITY).alias("_stored_identity")
        ).dropDuplicates([IMAGE_ID])
        ranked = ranked.join(stored, IMAGE_ID, "left")
        ranked = ranked.withColumn("_kept_path", F.coalesce("_stored_path", "_kept_path")).withColumn(
            "_kept_identity", F.when(F.col("_stored_path").isNotNull(), F.col("_stored_identity")).otherwise(
                F.col("_kept_identity"))
        )
    conflict = (
        F.col(IDENTITY).isNotNull() & F.col("_kept_identity").isNotNull() & (F.col(IDENTITY) != F.col("_kept_identity"))
    )
    detail = F.concat(F.lit("same bytes as "), F.col("_kept_path"), F.lit(" labelled "), F.col("_kept_identity"))
    conflicts = ranked.where(conflict).withColumn(REASON, F.lit(REASON_IDENTITY_CONFLICT)).withColumn(DETAIL, detail)
    keep = ranked.where(~conflict | F.col(IDENTITY).isNull() | F.col("_kept_identity").isNull())
    return keep.select(good.columns), conflicts


def run_ingest(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Run the ingest stage; its counts add up: read = written + already_present + quarantined."""
    params = IngestParams.from_config(cfg)
    run = StageRun(STAGE_NAME, params=asdict(params))
    source = _read_images(spark, params) if params.input_format == "images" else _read_parquet(spark, params)
    probed = probe(source).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        everything, read, quarantined_rows = _count_read(spark, params, source, probed)
        written, conflicted = _write_crops_and_quarantine(spark, cfg, everything)
        quarantined_rows += conflicted
    finally:
        probed.unpersist()
    run.counts = {
        "read": read,
        "written": written,
        "already_present": read - quarantined_rows - written,
        "quarantined": quarantined_rows,
        "identity_conflicts": conflicted,
    }
    return run.finish(spark, cfg, outputs=(CROPS, QUARANTINE))


def _count_read(
    spark: SparkSession, params: IngestParams, source: DataFrame, probed: DataFrame
) -> tuple[DataFrame, int, int]:
    """(every input row, rows read, rows to quarantine so far), zero-length files included.

    Why: Spark's file scan skips empty files, so they are added back from the listing as quarantined rows.
    """
    totals = probed.agg(F.count(F.lit(1)).alias("read"), F.count(REASON).alias("bad")).first()
    read, quarantined_rows = int(totals["read"]), int(totals["bad"])
    everything = probed
    if params.input_format == "images":
        listed_count = len(source._jdf.inputFiles())
        if listed_count > read:
            empties = _empty_files(spark, list(source.inputFiles()), probed)
            everything = probed.unionByName(empties)
            quarantined_rows += listed_count - read
            read = listed_count
    return everything, read, quarantined_rows


def _crop_rows(everything: DataFrame) -> DataFrame:
    """The decodable rows as crops-table rows (whole images: no parent, no face index)."""
    now = F.current_timestamp()
    return everything.where(F.col(REASON).isNull()).select(
        IMAGE_ID,
        F.lit(None).cast("string").alias(PARENT_IMAGE_ID),
        F.lit(None).cast("int").alias(FACE_INDEX),
        SOURCE_PATH,
        IDENTITY,
        WIDTH,
        HEIGHT,
        FORMAT,
        BYTES,
        now.alias(INGESTED_AT),
    )


def _write_crops_and_quarantine(spark: SparkSession, cfg: ErsConfig, everything: DataFrame) -> tuple[int, int]:
    """MERGE new crops and the quarantined rows (undecodable or identity conflicts); (written, conflicts)."""
    good, conflicts = split_identity_conflicts(spark, cfg, _crop_rows(everything))
    conflicts = conflicts.persist(StorageLevel.MEMORY_AND_DISK)
    conflicted = conflicts.count()
    bad = quarantine_rows(
        everything.where(F.col(REASON).isNotNull()), STAGE_NAME, F.col(REASON), F.col(DETAIL)
    ).unionByName(quarantine_rows(conflicts, STAGE_NAME, F.col(REASON), F.col(DETAIL)))
    written = merge_insert_new(spark, cfg, CROPS, good)
    merge_insert_new(spark, cfg, QUARANTINE, bad)
    conflicts.unpersist()
    return written, conflicted
