"""import-embeddings stage: a user's table of (id, vector[, identity, path]) -> embeddings (+ imported_sources).

Bring your own embeddings (paper sec. 3.5): vectors from any model (faces, person re-id, products)
enter the lake as the embed stage's output, under the model name and version the config gives, so
locate-ui, score, clean and evaluate run without images. Vectors are stored unit-normalised, as embed
stores them (score's ERS is ``1 - <f_UI, f>`` on unit vectors), with ``raw_norm`` the input's L2 norm.
Identity and source path, when the input has them, go to ``imported_sources`` (crops holds images, so
it gets no rows here); :func:`ers_spark.lake.tables.image_labels` serves both to the later stages.

A row that cannot become an embedding goes to quarantine with its reason, checked in this order:
``null_id``, ``empty_vector`` (null or zero-length), ``wrong_dimension`` (not the dimension of the
model's stored rows, or of the input's majority on a first import), ``non_finite``, ``zero_vector``,
``duplicate_id`` (one id on several rows that differ in vector, identity or path: every row of it),
``changed_vector`` (the id is stored for this model version with another vector: import it under a
new ``model_version``). Counts add up: ``read = written + already_present + duplicate_rows +
quarantined``, where ``duplicate_rows`` are exact repeats of a row that is written once. Everything
is MERGEd on its key, so a re-import writes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.errors import AnalysisException
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, FloatType, IntegerType, LongType, StringType

from ers_spark.config import ErsConfig, ImportEmbeddingsConfig
from ers_spark.errors import ContractError
from ers_spark.lake.contracts import (
    ALIGNED, DETAIL, EMBEDDED_AT, EMBEDDING, EMBEDDINGS, IDENTITY, IMAGE_ID, IMPORTED_AT, IMPORTED_SOURCES,
    MODEL_NAME, MODEL_VERSION, QUARANTINE, RAW_NORM, REASON, REASON_CHANGED_VECTOR, REASON_DUPLICATE_ID,
    REASON_EMPTY_VECTOR, REASON_NON_FINITE, REASON_NULL_ID, REASON_WRONG_DIMENSION, REASON_ZERO_VECTOR, SOURCE_PATH,
)
from ers_spark.runtime.cluster_paths import require_shared_paths
from ers_spark.lake.tables import (
    StageRun, ensure_table, merge_insert_new, merge_sync, of_model, quarantine_rows, read_table, table_exists,
    table_version,
)

STAGE_NAME = "import-embeddings"
log = logging.getLogger(__name__)

REASONS = (REASON_NULL_ID, REASON_EMPTY_VECTOR, REASON_WRONG_DIMENSION, REASON_NON_FINITE, REASON_ZERO_VECTOR,
           REASON_DUPLICATE_ID, REASON_CHANGED_VECTOR)
VECTOR = "_vector"  # the input vector as array<double>
FIRST = "_first"  # the first row of its id (exact repeats of a good row are written once)
FLOAT_MAX = float(np.finfo(np.float32).max)  # a larger norm cannot be stored as raw_norm (float)
CHANGED_TOLERANCE = 1e-6  # largest component difference of two unit vectors still counted as the same vector


def _label_column(df: DataFrame, name: str | None, what: str, allowed: tuple[type, ...]) -> Column:
    """An optional id/identity/path column as a string, or a one-line error naming its wrong type."""
    if name is None:
        return F.lit(None).cast("string")
    if name not in df.columns:
        raise ContractError(f"{what}: column '{name}' not found; the input has {', '.join(df.columns)}")
    dtype = df.schema[name].dataType
    if not isinstance(dtype, allowed):
        kinds = " or ".join(t().simpleString() for t in allowed)
        raise ContractError(f"{what}: column '{name}' is {dtype.simpleString()}, expected {kinds}")
    return F.col(name).cast("string")


def _vector_column(df: DataFrame, name: str, what: str) -> Column:
    """The vector column as array<double>: array<float>, array<double> or a Spark ML vector."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT

    if name not in df.columns:
        raise ContractError(f"{what}: column '{name}' not found; the input has {', '.join(df.columns)}")
    dtype = df.schema[name].dataType
    if isinstance(dtype, VectorUDT):
        return vector_to_array(F.col(name), "float64")
    if isinstance(dtype, ArrayType) and isinstance(dtype.elementType, (FloatType, DoubleType)):
        return F.col(name).cast(ArrayType(DoubleType()))
    raise ContractError(
        f"{what}: column '{name}' is {dtype.simpleString()}, expected array<float>, array<double> or an ML vector"
    )


def read_input(spark: SparkSession, params: ImportEmbeddingsConfig) -> DataFrame:
    """The user's table as (image_id, _vector, source_path, identity); a one-line error for a missing or mistyped column."""
    try:
        table = spark.read.format(params.input_format).load(params.input_path)
    except AnalysisException as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise ContractError(f"cannot read {params.input_format} input {params.input_path}: {first}") from None
    what = f"{params.input_format} input {params.input_path} (set import_embeddings.*_column)"
    return table.select(
        _label_column(table, params.id_column, what, (StringType, IntegerType, LongType)).alias(IMAGE_ID),
        _vector_column(table, params.vector_column, what).alias(VECTOR),
        _label_column(table, params.path_column, what, (StringType,)).alias(SOURCE_PATH),
        _label_column(table, params.identity_column, what, (StringType, IntegerType, LongType)).alias(IDENTITY),
    )


def stored_rows(spark: SparkSession, cfg: ErsConfig, params: ImportEmbeddingsConfig) -> DataFrame | None:
    """The embeddings already stored for this model version, or None when there are none."""
    if not table_exists(spark, cfg, EMBEDDINGS):
        return None
    stored = read_table(spark, cfg, EMBEDDINGS).where(of_model(params.model))
    return None if stored.isEmpty() else stored


def expected_dimension(rows: DataFrame, stored: DataFrame | None) -> tuple[int | None, str]:
    """(dimension every row must have, where it comes from): the model's stored rows, else the input's majority.

    Only the few distinct sizes reach the driver; a tie goes to the smaller dimension.
    """
    if stored is not None:
        return int(stored.select(F.size(EMBEDDING)).first()[0]), "stored rows of the model"
    sizes = (rows.where(F.size(VECTOR) > 0).groupBy(F.size(VECTOR).alias("dim")).count()
             .orderBy(F.desc("count"), "dim").first())
    return (int(sizes["dim"]), "majority of the input") if sizes is not None else (None, "no vector in the input")


def _reason(dim: int | None, norm: Column, duplicated: Column) -> tuple[Column, Column]:
    """(reason, detail) of a row, null when it can be imported; the first failing check wins."""
    size = F.coalesce(F.size(VECTOR), F.lit(-1))
    bad_value = F.exists(VECTOR, lambda x: x.isNull() | F.isnan(x) | (F.abs(x) == float("inf")))
    checks = [
        (F.col(IMAGE_ID).isNull(), REASON_NULL_ID, F.lit("the id column is null")),
        (size <= 0, REASON_EMPTY_VECTOR, F.lit("the vector is null or empty")),
        (size != F.lit(dim if dim is not None else -1), REASON_WRONG_DIMENSION,
         F.format_string("%d-D vector, expected %d-D", size, F.lit(dim if dim is not None else -1))),
        (bad_value | F.isnan(norm) | (norm > FLOAT_MAX), REASON_NON_FINITE,
         F.lit("a NaN or infinite component, or a norm beyond float range")),
        (norm <= 0, REASON_ZERO_VECTOR, F.lit("the vector has norm 0")),
        (duplicated, REASON_DUPLICATE_ID,
         F.format_string("id on %d rows that differ in vector, identity or path", F.col("_rows"))),
    ]
    reason, detail = F.lit(None).cast("string"), F.lit(None).cast("string")
    for condition, name, text in reversed(checks):
        reason = F.when(condition, F.lit(name)).otherwise(reason)
        detail = F.when(condition, text).otherwise(detail)
    return reason, detail


def classify(rows: DataFrame, dim: int | None) -> DataFrame:
    """Every input row with its unit embedding, raw norm, reason (null: importable) and first-of-its-id flag.

    One shuffle by id (a window) finds ids whose rows differ: their row hashes' min and max differ.
    """
    by_id = Window.partitionBy(IMAGE_ID)
    row_hash = F.xxhash64(VECTOR, SOURCE_PATH, IDENTITY)
    norm = F.sqrt(F.aggregate(VECTOR, F.lit(0.0), lambda acc, x: acc + x * x))
    with_stats = rows.select(
        "*", norm.alias("_norm"), F.count(F.lit(1)).over(by_id).alias("_rows"),
        (F.min(row_hash).over(by_id) != F.max(row_hash).over(by_id)).alias("_differ"),
        (F.row_number().over(by_id.orderBy(row_hash)) == 1).alias(FIRST),
    )
    reason, detail = _reason(dim, F.col("_norm"), F.col(IMAGE_ID).isNotNull() & F.col("_differ"))
    null_id = F.concat(F.lit("null-id:"), F.xxhash64(VECTOR, SOURCE_PATH, IDENTITY).cast("string"))
    decided = with_stats.select("*", reason.alias(REASON), detail.alias(DETAIL))
    good = F.col(REASON).isNull()  # only good rows are divided and narrowed to float (ANSI mode would fail the rest)
    return decided.select(
        F.coalesce(F.col(IMAGE_ID), null_id).alias(IMAGE_ID),
        F.when(good, F.transform(VECTOR, lambda x: (x / F.col("_norm")).cast("float"))).alias(EMBEDDING),
        F.when(good, F.col("_norm").cast("float")).alias(RAW_NORM),
        SOURCE_PATH, IDENTITY, REASON, DETAIL, FIRST,
    )


def flag_changed_vectors(classified: DataFrame, stored: DataFrame | None) -> DataFrame:
    """Mark good rows whose id is stored for this model version with another vector (``changed_vector``)."""
    if stored is None:
        return classified
    previous = stored.select(IMAGE_ID, F.col(EMBEDDING).alias("_stored"))
    gap = F.aggregate(F.zip_with(EMBEDDING, "_stored", lambda a, b: F.abs(a - b)), F.lit(0.0).cast("float"),
                      lambda acc, x: F.greatest(acc, x))
    changed = F.col(REASON).isNull() & F.col("_stored").isNotNull() & (
        (F.size(EMBEDDING) != F.size("_stored")) | (gap > CHANGED_TOLERANCE))
    return classified.join(previous, IMAGE_ID, "left").select(
        IMAGE_ID, EMBEDDING, RAW_NORM, SOURCE_PATH, IDENTITY, FIRST,
        F.when(changed, F.lit(REASON_CHANGED_VECTOR)).otherwise(F.col(REASON)).alias(REASON),
        F.when(changed, F.format_string("differs from the vector stored for this id (max component gap %.3g); "
                                        "import it under a new model_version", gap)).otherwise(F.col(DETAIL)).alias(DETAIL),
    )


def labels_to_store(spark: SparkSession, cfg: ErsConfig, params: ImportEmbeddingsConfig, good: DataFrame) -> DataFrame:
    """imported_sources rows of the good ids; a label column this import does not name keeps its stored value."""
    name, version = params.model
    labels = good.where(F.col(FIRST)).select(IMAGE_ID, SOURCE_PATH, IDENTITY)
    if (params.path_column is None or params.identity_column is None) and table_exists(spark, cfg, IMPORTED_SOURCES):
        stored = read_table(spark, cfg, IMPORTED_SOURCES).select(
            IMAGE_ID, F.col(SOURCE_PATH).alias("_path"), F.col(IDENTITY).alias("_identity"))
        labels = labels.join(stored, IMAGE_ID, "left").select(
            IMAGE_ID,
            (F.col(SOURCE_PATH) if params.path_column else F.col("_path")).alias(SOURCE_PATH),
            (F.col(IDENTITY) if params.identity_column else F.col("_identity")).alias(IDENTITY),
        )
    return labels.select(
        "*", F.lit(name).alias(MODEL_NAME), F.lit(version).alias(MODEL_VERSION),
        F.current_timestamp().alias(IMPORTED_AT),
    )


def write_outputs(spark: SparkSession, cfg: ErsConfig, params: ImportEmbeddingsConfig, decided: DataFrame) -> dict[str, int]:
    """MERGE the good rows into embeddings (and their labels into imported_sources), the bad ones into quarantine."""
    name, version = params.model
    good = decided.where(F.col(REASON).isNull())
    embeddings = good.select(
        IMAGE_ID, EMBEDDING, RAW_NORM, F.lit(name).alias(MODEL_NAME),
        F.lit(version).alias(MODEL_VERSION), F.current_timestamp().alias(EMBEDDED_AT),
        F.lit(None).cast("boolean").alias(ALIGNED),
    )
    ensure_table(spark, cfg, EMBEDDINGS, properties={"ers.model_name": name, "ers.model_version": version})
    written = merge_insert_new(spark, cfg, EMBEDDINGS, embeddings)
    labels = {"inserted": 0, "updated": 0, "deleted": 0}
    if params.identity_column or params.path_column:
        labels = merge_sync(spark, cfg, IMPORTED_SOURCES, labels_to_store(spark, cfg, params, good),
                            compare=(SOURCE_PATH, IDENTITY))
    bad = quarantine_rows(decided.where(F.col(REASON).isNotNull()), STAGE_NAME, F.col(REASON), F.col(DETAIL),
                          model_version=F.lit(version))
    merge_insert_new(spark, cfg, QUARANTINE, bad)
    return {"written": written, "labels_written": labels["inserted"] + labels["updated"]}


def tally(decided: DataFrame) -> dict[str, int]:
    """Rows per reason, and good rows that are the first of their id (one small aggregate)."""
    rows = decided.groupBy(REASON).agg(F.count(F.lit(1)).alias("n"), F.sum(F.col(FIRST).cast("long")).alias("first"))
    counts: dict[str, int] = {reason: 0 for reason in REASONS}
    good = distinct_good = 0
    for row in rows.collect():
        if row[REASON] is None:
            good, distinct_good = int(row["n"]), int(row["first"])
        else:
            counts[row[REASON]] = int(row["n"])
    return {"good": good, "distinct_good": distinct_good, **counts}


def run_import_embeddings(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Run the import; counts: read = written + already_present + duplicate_rows + quarantined."""
    params = cfg.import_embeddings
    params.require(cfg.source)
    require_shared_paths(cfg, spark.sparkContext.master, {"import_embeddings.input_path": params.input_path})
    rows = read_input(spark, params)
    run = StageRun(STAGE_NAME, params={**asdict(params), "model_version": params.model[1]})
    run.input_versions = {c.name: table_version(spark, cfg, c) for c in (EMBEDDINGS, IMPORTED_SOURCES)}
    stored = stored_rows(spark, cfg, params)
    dim, dim_source = expected_dimension(rows, stored)
    run.params.update(dimension=dim, dimension_source=dim_source)
    decided = flag_changed_vectors(classify(rows, dim), stored).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        tallied = tally(decided)
        written = write_outputs(spark, cfg, params, decided)
    finally:
        decided.unpersist()
    run.counts = _counts(tallied, written)
    log.info("import-embeddings: %d rows read, %d new embeddings of %s %s (%s-D, %s), %d quarantined",
             run.counts["read"], written["written"], *params.model, dim, dim_source,
             run.counts["quarantined"])
    return run.finish(spark, cfg, outputs=(EMBEDDINGS, IMPORTED_SOURCES, QUARANTINE))


def _counts(tallied: dict[str, int], written: dict[str, int]) -> dict[str, Any]:
    """The run record's counts from the tally and the MERGE results (they add up to ``read``)."""
    quarantined = sum(tallied[r] for r in REASONS)
    return {
        "read": tallied["good"] + quarantined,
        "written": written["written"],
        "already_present": tallied["distinct_good"] - written["written"],
        "duplicate_rows": tallied["good"] - tallied["distinct_good"],
        "quarantined": quarantined,
        "labels_written": written["labels_written"],
        **{r: tallied[r] for r in REASONS},
    }
