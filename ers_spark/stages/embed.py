"""Embed stage: crops -> embeddings (one L2-normalised float32 vector per image, plus its raw norm).

Inference runs on the executors that hold the crops, in Arrow batches
(``mapInArrow``): each Python worker opens the model once (ONNX Runtime, or
torch) from the copy Spark shipped to its executor, decodes a whole batch, and
runs it in sub-batches of ``embed.batch_size``. When Spark gave the task a GPU
(``TaskContext`` resources ``gpu``), that device is used; otherwise the CPU.
When the model's spec declares the alignment its network was trained on (the
default dlib model: dlib's 150 px chips), each crop's largest face is cut that
way in the same pass, before inference (``embed.align: auto``); no chip is
written anywhere. Only crops without an embedding for the current model version are embedded, so
re-runs embed nothing. A crop whose bytes do not decode, whose embedding comes
out zero or non-finite, or (``embed.no_face: quarantine``) with no face, goes to quarantine tagged with the model version; a
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
from ers_spark.distributed.align import NO_FACE_DETAIL
from ers_spark.distributed.gpu_profile import check_gpu_request, embed_resource_profile, gpu_settings
from ers_spark.distributed.inference import (
    FACES_FOUND,
    TASK_RUNTIME,
    ModelFile,
    embed_dataframe,
    preflight_model,
    resolve_model,
    ship_model,
)
from ers_spark.lake.contracts import (
    ALIGNED,
    CROPS,
    DETAIL,
    EMBEDDED_AT,
    EMBEDDING,
    EMBEDDINGS,
    IMAGE_ID,
    MODEL_NAME,
    MODEL_VERSION,
    QUARANTINE,
    RAW_NORM,
    REASON_EMBED_FAILED,
    REASON_NO_FACE,
    SOURCE_PATH,
    STAGE,
)
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


def plan_embed(spark: SparkSession, cfg: ErsConfig) -> ModelFile:
    """Check everything a job-level failure could come from before any Spark work, then ship the model."""
    emb = cfg.embed
    params = resolve_model(emb)
    check_gpu_request(gpu_settings(spark), emb)
    if emb.backend == "onnx":
        check_onnxruntime(require_cuda=False)
        log.info("embed: ONNX Runtime on the driver: %s", onnxruntime_report())
    if params.alignment is not None:
        from ers_spark.models.align import require_dlib

        require_dlib(params.alignment)
    preflight_model(params, emb)
    return ship_model(spark, params)


def run_params(params: ModelFile, emb: EmbedConfig) -> dict[str, Any]:
    """The run record's params: the model that ran (its spec by name) and the ``embed.*`` settings the executors use."""
    executors = ("backend", "device", "batch_size", "intra_op_threads", "fp16", "max_failed_share", "align",
                 "gpus_per_task")
    aligning = ("no_face", "align_min_side") if params.alignment is not None else ()
    return {**asdict(params), "spec": params.spec.name, **{key: getattr(emb, key) for key in executors + aligning}}


def runtime_summary(embedded: DataFrame) -> dict[str, Any]:
    """Tasks per device and per GPU address Spark gave them ("none": no GPU), and where executors found the
    model and the code (one row per task)."""
    rows = [json.loads(r[0]) for r in embedded.where(F.col(TASK_RUNTIME).isNotNull()).select(TASK_RUNTIME).collect()]
    tasks_by_device: dict[str, int] = {}
    tasks_by_gpus: dict[str, int] = {}
    for row in rows:
        tasks_by_device[row["device"]] = tasks_by_device.get(row["device"], 0) + 1
        gpus = ",".join(row.get("gpus") or []) or "none"
        tasks_by_gpus[gpus] = tasks_by_gpus.get(gpus, 0) + 1
    return {
        "tasks_by_device": tasks_by_device,
        "tasks_by_gpus": tasks_by_gpus,
        "model_copies": sorted({r["model_path"] for r in rows}),
        "code": sorted({r["code"] for r in rows}),
        "hosts": sorted({r["host"] for r in rows}),
    }


def run_embed(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Run the embed stage; counts: to_embed = written + quarantined, crops = to_embed + already_embedded.

    When the model's alignment applies, ``aligned + embedded_unaligned + no_face + undecodable = to_embed``
    (``no_face`` crops are quarantined; the others that fail are ``embed_failed``).
    """
    params = plan_embed(spark, cfg)
    run = StageRun(STAGE_NAME, params=run_params(params, cfg.embed))
    crops = read_table(spark, cfg, CROPS, hint="run `ers-spark ingest` first")
    run.input_versions = {CROPS.name: table_version(spark, cfg, CROPS)}
    total = crops.count()
    pending = pending_crops(spark, cfg, crops, params)
    profile = embed_resource_profile(gpu_settings(spark), cfg.embed)
    embedded = embed_dataframe(pending, params, cfg.embed, profile).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        totals = embedded.agg(*embed_totals(params)).first().asDict()
        to_embed, quarantined = int(totals.pop("to_embed")), int(totals.pop("quarantined"))
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
        **{key: int(value) for key, value in totals.items()},
    }
    alignment = params.alignment.tag(params.spec.input_width) if params.alignment else "none (resized as they are)"
    log.info("embed: %d new crops to embed (%d already embedded with %s %s); alignment: %s; tasks by device: %s",
             to_embed, total - to_embed, params.spec.name, params.model_version, alignment,
             run.runtime["tasks_by_device"])
    return run.finish(spark, cfg, outputs=(EMBEDDINGS, QUARANTINE))


def embed_totals(params: ModelFile) -> list[Any]:
    """The run record's counts, in one aggregate over the embedded rows; alignment's own counts when aligning."""
    totals = [F.count(F.lit(1)).alias("to_embed"), F.count(DETAIL).alias("quarantined")]
    if params.alignment is None:
        return totals
    return totals + [
        F.count_if(F.col(ALIGNED)).alias("aligned"),
        F.count_if(~F.col(ALIGNED)).alias("embedded_unaligned"),
        F.count_if(F.col(DETAIL) == NO_FACE_DETAIL).alias("no_face"),
        F.count_if(F.col(FACES_FOUND) > 1).alias("several_faces"),
    ]


def write_embeddings(spark: SparkSession, cfg: ErsConfig, params: ModelFile, embedded: DataFrame,
                     pending: DataFrame, to_embed: int, quarantined: int) -> int:
    """MERGE the good rows into embeddings and the failed ones into quarantine (tagged with the model version)."""
    now = F.current_timestamp()
    good = embedded.where(F.col(DETAIL).isNull()).select(
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
        F.when(F.col(DETAIL) == NO_FACE_DETAIL, F.lit(REASON_NO_FACE)).otherwise(F.lit(REASON_EMBED_FAILED)),
        F.col(DETAIL),
        model_version=F.lit(params.model_version),
    )
    properties = {"ers.model_name": params.spec.name, "ers.model_version": params.model_version}
    ensure_table(spark, cfg, EMBEDDINGS, properties=properties)
    written = merge_insert_new(spark, cfg, EMBEDDINGS, good) if to_embed > quarantined else 0
    if quarantined:
        merge_insert_new(spark, cfg, QUARANTINE, bad)
    return written
