"""Embed stage: crops -> embeddings (one L2-normalised float32 vector per image, plus its raw norm).

Inference runs on the executors that hold the crops, in Arrow batches
(``mapInArrow``): each Python worker opens the model once (ONNX Runtime, or
torch) from the copy Spark shipped to its executor, decodes a whole batch, and
runs it in sub-batches of ``embed.batch_size``. When Spark gave the task a GPU
(``TaskContext`` resources ``gpu``), that device is used; otherwise the CPU.
Only crops without an embedding for the current model version are embedded, so
re-runs embed nothing. A crop whose bytes do not decode, or whose embedding comes
out zero or non-finite, goes to quarantine tagged with the model version; a
broken model or executor fails the job instead (see :func:`plan_embed`).

The executors' side (the model shipped through Spark, the ``mapInArrow`` function, alignment) is in
:mod:`ers_spark.distributed.inference` and :mod:`ers_spark.distributed.align`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from ers_spark.config import EmbedConfig, ErsConfig
from ers_spark.distributed.align import ALIGN_OUTPUT_SCHEMA, make_align_batches
from ers_spark.distributed.inference import (
    TASK_RUNTIME,
    ModelFile,
    embed_dataframe,
    preflight_model,
    resolve_model,
    ship_model,
)
from ers_spark.lake.contracts import (
    ALIGNED,
    BYTES,
    CROPS,
    DETAIL,
    EMBEDDED_AT,
    EMBEDDING,
    EMBEDDINGS,
    FACE_INDEX,
    FORMAT,
    HEIGHT,
    IDENTITY,
    IMAGE_ID,
    INGESTED_AT,
    MODEL_NAME,
    MODEL_VERSION,
    PARENT_IMAGE_ID,
    QUARANTINE,
    RAW_NORM,
    REASON,
    REASON_EMBED_FAILED,
    REASON_NO_FACE,
    REASON_UNDECODABLE,
    SOURCE_PATH,
    STAGE,
    WIDTH,
)
from ers_spark.errors import ConfigError
from ers_spark.lake.tables import (
    StageRun,
    ensure_table,
    merge_insert_new,
    of_model,
    quarantine_rows,
    read_table,
    table_exists,
    table_version,
)
from ers_spark.models.devices import check_onnxruntime, onnxruntime_report
from ers_spark.models.spec import ModelSpec

STAGE_NAME = "embed"
log = logging.getLogger(__name__)


def pending_ids(spark: SparkSession, cfg: ErsConfig, crops: DataFrame, params: ModelFile) -> DataFrame | None:
    """Ids of the crops with no embedding for this model version yet and not quarantined by embed *with this
    version*; None when nothing has been embedded or quarantined yet (every crop is pending).

    Only id columns take part, so the anti-joins shuffle ids, never image bytes. A crop quarantined
    under an older model version is tried again (the model may read it now).
    """
    ids, filtered = crops.select(IMAGE_ID), False
    if table_exists(spark, cfg, QUARANTINE):
        failed = read_table(spark, cfg, QUARANTINE).where((F.col(STAGE) == STAGE_NAME) & (F.col(MODEL_VERSION) == params.model_version))
        ids, filtered = ids.join(failed.select(IMAGE_ID), IMAGE_ID, "left_anti"), True
    if table_exists(spark, cfg, EMBEDDINGS):
        done = read_table(spark, cfg, EMBEDDINGS).where(of_model((params.spec.name, params.model_version))).select(IMAGE_ID)
        ids, filtered = ids.join(done, IMAGE_ID, "left_anti"), True
    return ids if filtered else None


def pending_crops(spark: SparkSession, cfg: ErsConfig, crops: DataFrame, params: ModelFile) -> DataFrame:
    """The pending crops with their bytes: the id-only anti-joins of :func:`pending_ids`, then one semi-join
    that reads bytes only for the pending rows (adaptive execution broadcasts a small id set, so a re-run
    with little to do shuffles no bytes at all)."""
    ids = pending_ids(spark, cfg, crops, params)
    return crops if ids is None else crops.join(ids, IMAGE_ID, "left_semi")


def photos_to_align(spark: SparkSession, cfg: ErsConfig) -> DataFrame:
    """Photos (crops rows without a parent) that have no chip yet and, under ``no_face: quarantine``, no no_face row.

    Under ``embed_unaligned`` a photo once quarantined as no_face is tried again (it gets a centred resize).
    """
    crops = read_table(spark, cfg, CROPS)
    photos = crops.where(F.col(PARENT_IMAGE_ID).isNull())
    done = crops.where(F.col(PARENT_IMAGE_ID).isNotNull()).select(F.col(PARENT_IMAGE_ID).alias(IMAGE_ID))
    if cfg.embed.no_face == "quarantine" and table_exists(spark, cfg, QUARANTINE):
        no_face = (
            read_table(spark, cfg, QUARANTINE)
            .where((F.col(STAGE) == "align") & (F.col(REASON) == REASON_NO_FACE))
            .select(IMAGE_ID)
        )
        done = done.unionByName(no_face)
    return photos.join(done.distinct(), IMAGE_ID, "left_anti")


def align_photos(spark: SparkSession, cfg: ErsConfig, spec: ModelSpec) -> dict[str, int]:
    """Cut aligned chips out of photos not aligned yet; chips become crops rows (parent id + face index).

    Photos are the crops rows without a parent; each face becomes a new crop whose
    image_id is the sha256 of the chip's PNG bytes. A photo with no face becomes one crop
    holding its centred resize with a null face index (``embed.no_face: embed_unaligned``, the
    default; embedded with ``aligned = false``) or goes to quarantine with reason ``no_face``
    (``embed.no_face: quarantine``). Small photos are enlarged before detection
    (``embed.align_min_side``). Already-aligned photos are skipped on re-runs.
    """
    todo = photos_to_align(spark, cfg)
    batches = make_align_batches(spec.input_width, cfg.embed.align_min_side, cfg.embed.no_face == "embed_unaligned")
    aligned = (
        todo.select(IMAGE_ID, BYTES)
        .mapInPandas(batches, ALIGN_OUTPUT_SCHEMA)
        .join(todo.select(F.col(IMAGE_ID).alias(PARENT_IMAGE_ID), SOURCE_PATH, IDENTITY), PARENT_IMAGE_ID)
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    try:
        chips = aligned.where(F.col(DETAIL).isNull()).select(
            F.sha2(F.col(BYTES), 256).alias(IMAGE_ID),
            PARENT_IMAGE_ID,
            FACE_INDEX,
            F.concat(F.col(SOURCE_PATH), F.coalesce(F.concat(F.lit("#face"), F.col(FACE_INDEX).cast("string")),
                                                    F.lit("#unaligned"))).alias(SOURCE_PATH),
            IDENTITY,
            F.lit(spec.input_width).alias(WIDTH),
            F.lit(spec.input_height).alias(HEIGHT),
            F.lit("png").alias(FORMAT),
            BYTES,
            F.current_timestamp().alias(INGESTED_AT),
        )
        failed = quarantine_rows(
            aligned.where(F.col(DETAIL).isNotNull()).withColumnRenamed(PARENT_IMAGE_ID, IMAGE_ID),
            "align",
            F.when(F.col(DETAIL).startswith("undecodable"), F.lit(REASON_UNDECODABLE)).otherwise(F.lit(REASON_NO_FACE)),
            F.col(DETAIL),
        )
        unaligned = aligned.where(F.col(DETAIL).isNull() & F.col(FACE_INDEX).isNull()).count()
        new_chips = merge_insert_new(spark, cfg, CROPS, chips)
        no_faces = merge_insert_new(spark, cfg, QUARANTINE, failed)
    finally:
        aligned.unpersist()
    return {"chips_written": new_chips, "photos_without_face": no_faces, "photos_embedded_unaligned": unaligned}


def plan_embed(spark: SparkSession, cfg: ErsConfig) -> ModelFile:
    """Check everything a job-level failure could come from before any Spark work, then ship the model."""
    emb = cfg.embed
    params = resolve_model(emb)
    if emb.device == "cuda" and spark.conf.get("spark.task.resource.gpu.amount", None) is None:
        raise ConfigError(
            "embed.device=cuda but Spark gives tasks no GPU: set spark.task.resource.gpu.amount "
            "(and spark.executor.resource.gpu.amount) or use embed.device=auto"
        )
    if emb.backend == "onnx":
        check_onnxruntime(require_cuda=False)
        log.info("embed: ONNX Runtime on the driver: %s", onnxruntime_report())
    if emb.align:
        from ers_spark.models.align import require_dlib

        require_dlib()
    preflight_model(params, emb)
    return ship_model(spark, params)


def run_params(params: ModelFile, emb: EmbedConfig) -> dict[str, Any]:
    """The run record's params: the model that ran (its spec by name) and the ``embed.*`` settings the executors use."""
    executors = ("backend", "device", "batch_size", "intra_op_threads", "fp16", "max_failed_share")
    return {**asdict(params), "spec": params.spec.name, **{key: getattr(emb, key) for key in executors}}


def runtime_summary(embedded: DataFrame) -> dict[str, Any]:
    """Tasks per device, and where executors found the model and the code (one row per task)."""
    rows = [json.loads(r[0]) for r in embedded.where(F.col(TASK_RUNTIME).isNotNull()).select(TASK_RUNTIME).collect()]
    tasks_by_device: dict[str, int] = {}
    for row in rows:
        tasks_by_device[row["device"]] = tasks_by_device.get(row["device"], 0) + 1
    return {
        "tasks_by_device": tasks_by_device,
        "model_copies": sorted({r["model_path"] for r in rows}),
        "code": sorted({r["code"] for r in rows}),
        "hosts": sorted({r["host"] for r in rows}),
    }


def run_embed(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Run the embed stage; counts: to_embed = written + quarantined, crops = to_embed + already_embedded."""
    params = plan_embed(spark, cfg)
    run = StageRun(STAGE_NAME, params=run_params(params, cfg.embed))
    align_counts: dict[str, int] = {}
    crops = read_table(spark, cfg, CROPS, hint="run `ers-spark ingest` first")
    if cfg.embed.align:
        align_counts = align_photos(spark, cfg, params.spec)
        # with alignment on, the model sees the aligned chips, not the whole photos
        crops = read_table(spark, cfg, CROPS).where(F.col(PARENT_IMAGE_ID).isNotNull())
    run.input_versions = {CROPS.name: table_version(spark, cfg, CROPS)}
    total = crops.count()
    pending = pending_crops(spark, cfg, crops, params)
    embedded = embed_dataframe(pending, params, cfg.embed).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        totals = embedded.agg(F.count(F.lit(1)).alias("n"), F.count(DETAIL).alias("bad")).first()
        to_embed, quarantined = int(totals["n"]), int(totals["bad"])
        run.runtime = runtime_summary(embedded)
        if cfg.embed.backend == "onnx":
            run.runtime["onnxruntime_on_driver"] = onnxruntime_report()
        written = write_embeddings(spark, cfg, params, embedded, pending, to_embed, quarantined)
    finally:
        embedded.unpersist()
    run.counts = {
        "crops": total,
        "already_embedded": total - to_embed,
        "to_embed": to_embed,
        "written": written,
        "quarantined": quarantined,
        **align_counts,
    }
    log.info("embed: %d new crops to embed (%d already embedded with %s %s); tasks by device: %s",
             to_embed, total - to_embed, params.spec.name, params.model_version, run.runtime["tasks_by_device"])
    return run.finish(spark, cfg, outputs=(EMBEDDINGS, QUARANTINE))


def aligned_flag(cfg: ErsConfig) -> Any:
    """The ``aligned`` column of a crop: a detected face chip (true), a centred resize (false), or null (align off)."""
    if cfg.embed.align:
        return F.col(FACE_INDEX).isNotNull().alias(ALIGNED)
    return F.lit(None).cast("boolean").alias(ALIGNED)


def write_embeddings(spark: SparkSession, cfg: ErsConfig, params: ModelFile, embedded: DataFrame,
                     pending: DataFrame, to_embed: int, quarantined: int) -> int:
    """MERGE the good rows into embeddings and the failed ones into quarantine (tagged with the model version)."""
    now = F.current_timestamp()
    good = embedded.where(F.col(DETAIL).isNull()).join(pending.select(IMAGE_ID, aligned_flag(cfg)), IMAGE_ID).select(
        IMAGE_ID,
        EMBEDDING,
        RAW_NORM,
        F.lit(params.spec.name).alias(MODEL_NAME),
        F.lit(params.model_version).alias(MODEL_VERSION),
        now.alias(EMBEDDED_AT),
        ALIGNED,
    )
    bad = quarantine_rows(
        embedded.where(F.col(DETAIL).isNotNull()).join(pending.select(IMAGE_ID, SOURCE_PATH), IMAGE_ID),
        STAGE_NAME,
        F.lit(REASON_EMBED_FAILED),
        F.col(DETAIL),
        model_version=F.lit(params.model_version),
    )
    properties = {"ers.model_name": params.spec.name, "ers.model_version": params.model_version}
    ensure_table(spark, cfg, EMBEDDINGS, properties=properties)
    written = merge_insert_new(spark, cfg, EMBEDDINGS, good) if to_embed > quarantined else 0
    if quarantined:
        merge_insert_new(spark, cfg, QUARANTINE, bad)
    return written
