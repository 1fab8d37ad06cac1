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
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, BinaryType, FloatType, IntegerType, StringType, StructField, StructType

from ers_spark.config import ErsConfig
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
from ers_spark.errors import ConfigError, ModelError
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
from ers_spark.models.devices import check_onnxruntime, onnxruntime_report, task_cuda_index
from ers_spark.models.spec import ModelSpec, file_sha256, load_model_spec, resolve_model_file

STAGE_NAME = "embed"
TASK_RUNTIME = "task_runtime"
log = logging.getLogger(__name__)

EMBED_OUTPUT_SCHEMA = StructType(
    [
        StructField(IMAGE_ID, StringType(), False),
        StructField(EMBEDDING, ArrayType(FloatType()), True),
        StructField(RAW_NORM, FloatType(), True),
        StructField(DETAIL, StringType(), True),
        StructField(TASK_RUNTIME, StringType(), True),
    ]
)


# Below this share of failed rows a partition is data with some bad crops; above it, a broken model or executor.
MIN_ROWS_FOR_FAILED_SHARE = 10


@dataclass(frozen=True)
class EmbedParams:
    """Everything an executor needs to embed a batch; small and picklable.

    The model travels through Spark itself: :func:`ship_model` registers the file with
    ``SparkContext.addFile`` under ``shipped_name`` and every executor reads its own copy
    (checked against ``model_sha256``); ``model_path`` is the driver's file.
    """

    spec: ModelSpec
    model_path: str
    model_sha256: str
    model_version: str
    backend: str
    device: str
    batch_size: int
    intra_op_threads: int
    fp16: bool
    max_failed_share: float = 0.5
    shipped_name: str | None = None

    @classmethod
    def from_config(cls, cfg: ErsConfig) -> "EmbedParams":
        """Resolve the model on the driver, so a missing file or bad checksum fails before any Spark work."""
        emb = cfg.embed
        spec = load_model_spec(emb.model)
        path = resolve_model_file(spec, os.path.expanduser(emb.model_cache_dir))
        digest = file_sha256(path)
        return cls(
            spec=spec,
            model_path=str(path),
            model_sha256=digest,
            model_version=f"{spec.version}+{digest[:12]}",
            backend=emb.backend,
            device=emb.device,
            batch_size=emb.batch_size,
            intra_op_threads=emb.intra_op_threads,
            fp16=emb.fp16,
            max_failed_share=emb.max_failed_share,
        )

    def loggable(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.name
        return data


def ship_model(spark: SparkSession, params: EmbedParams) -> EmbedParams:
    """Send the model file to every executor through Spark (``addFile``), under a content-addressed name.

    The name carries the sha256, so a changed model never collides with a copy an
    executor already holds; executors fetch it once into their own work directory.
    """
    name = f"{params.spec.name}-{params.model_sha256[:16]}{Path(params.model_path).suffix or '.onnx'}"
    staged = Path(params.model_path).parent / "shipped" / name
    if not staged.is_file():
        staged.parent.mkdir(parents=True, exist_ok=True)
        tmp = staged.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(params.model_path, tmp)
        os.replace(tmp, staged)
    spark.sparkContext.addFile(str(staged))
    return replace(params, shipped_name=name)


def local_model_path(params: EmbedParams) -> str:
    """This process's copy of the model: the executor's shipped file (sha256 checked), else the driver's path."""
    if params.shipped_name is None:
        return params.model_path
    from pyspark import SparkFiles

    path = SparkFiles.get(params.shipped_name)
    if not os.path.isfile(path):
        raise ModelError(f"model {params.shipped_name} did not reach this executor (looked at {path})")
    actual = file_sha256(path)
    if actual != params.model_sha256:
        raise ModelError(
            f"model copy {path} on this executor has sha256 {actual[:16]}..., the driver's has "
            f"{params.model_sha256[:16]}...: the transfer corrupted it or the file changed during the job"
        )
    return path


def preflight_model(params: EmbedParams) -> None:
    """Open the model on the driver's CPU and embed two blank images, so a broken model fails the job at once.

    Catches a corrupt file, a wrong input shape and a wrong output dimension before any
    Spark work; what only an executor can see (its CUDA) is checked in the task.
    """
    from ers_spark.models.preprocess import prepare_arrays

    spec = params.spec
    blank = [np.full((spec.input_height, spec.input_width, 3), 128, np.uint8)] * 2
    embedder = open_embedder(params, params.model_path, device_id=None)
    unit, norms = embedder.embed(prepare_arrays(blank, spec))
    if not np.isfinite(unit).all() or not np.isfinite(norms).all():
        raise ModelError(f"model {params.model_path} returns non-finite embeddings for a blank image; it is broken")


# one model per Python worker process, keyed by what makes it different
_EMBEDDERS: dict[tuple[Any, ...], Any] = {}


def task_device(params: EmbedParams) -> int | None:
    """The CUDA index for this task (None: CPU); ``embed.device=cuda`` without a GPU fails the task."""
    if params.device == "cpu":
        return None
    device_id = task_cuda_index()
    if device_id is None and params.device == "cuda":
        raise ModelError(
            "embed.device=cuda but Spark gave this task no GPU: set spark.executor.resource.gpu.amount, "
            "spark.task.resource.gpu.amount and a discovery script (deploy/spark/gpu_discovery.sh)"
        )
    return device_id


def open_embedder(params: EmbedParams, model_path: str, device_id: int | None) -> Any:
    """An embedder with its session or module already loaded (so load failures are job failures)."""
    require_gpu = params.device == "cuda"
    if params.backend == "torch":
        from ers_spark.models.torch_runner import TorchEmbedder

        device = f"cuda:{device_id}" if device_id is not None else "cpu"
        embedder = TorchEmbedder(model_path, params.spec, device=device, fp16=params.fp16)
        if device_id is not None and not require_gpu and not _torch_cuda_available():
            log.warning("GPU %s given to the task but torch sees no CUDA; running on CPU", device_id)
            embedder = TorchEmbedder(model_path, params.spec, device="cpu", fp16=params.fp16)
        _ = embedder.module
        return embedder
    from ers_spark.models.onnx_runner import OnnxEmbedder

    embedder = OnnxEmbedder(
        model_path, params.spec, device_id=device_id, intra_op_threads=params.intra_op_threads, require_gpu=require_gpu
    )
    _ = embedder.session
    return embedder


def _torch_cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def get_embedder(params: EmbedParams, device_id: int | None) -> Any:
    """Load the model once per worker process (like predict_batch_udf's make_predict_fn)."""
    key = (params.shipped_name or params.model_path, params.model_sha256, params.backend, device_id,
           params.intra_op_threads, params.fp16, params.device)
    embedder = _EMBEDDERS.get(key)
    if embedder is None:
        embedder = open_embedder(params, local_model_path(params), device_id)
        _EMBEDDERS[key] = embedder
    return embedder


def embed_images(images: list[bytes | None], params: EmbedParams, embedder: Any) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Decode and embed one batch of encoded images.

    Returns unit embeddings and raw norms for every input row (NaN rows where it
    failed) and one failure reason per row (None when it worked). Only per-image
    problems become reasons: bytes that do not decode, or an embedding that comes
    out zero or non-finite. An exception of the model itself is a broken job, not
    bad data, and propagates.
    """
    from ers_spark.models.preprocess import decode_images, prepare_arrays

    n = len(images)
    dim = params.spec.embedding_dim
    unit = np.full((n, dim), np.nan, dtype=np.float32)
    norms = np.full(n, np.nan, dtype=np.float32)
    decoded, reasons = decode_images(images, params.spec)
    rows = np.array([i for i, arr in enumerate(decoded) if arr is not None], dtype=np.int64)
    for start in range(0, len(rows), params.batch_size):
        chunk = rows[start : start + params.batch_size]
        # float conversion per sub-batch: a small working set that stays in cache
        sub = prepare_arrays([decoded[row] for row in chunk], params.spec)
        unit[chunk], norms[chunk] = embedder.embed(sub)
    bad = ~np.isfinite(norms) | (norms <= 0)
    for row in np.flatnonzero(bad & np.array([r is None for r in reasons])):
        reasons[row] = "model returned a zero or non-finite embedding"
    return unit, norms, reasons


def check_failed_share(failed: int, rows: int, first_reason: str | None, params: EmbedParams) -> None:
    """Fail the task when most of a partition failed: that is a broken model or executor, not bad data."""
    if rows >= MIN_ROWS_FOR_FAILED_SHARE and failed > params.max_failed_share * rows:
        raise ModelError(
            f"{failed} of {rows} crops in one partition failed to embed (first: {first_reason}); more than "
            f"embed.max_failed_share={params.max_failed_share}: the model or this executor is broken, not the data"
        )


def task_runtime(embedder: Any, model_path: str) -> str:
    """One JSON line describing where this task ran: device, model copy, code origin, host."""
    import socket

    return json.dumps(
        {"device": embedder.runtime, "model_path": os.path.abspath(model_path), "code": os.path.abspath(__file__),
         "host": socket.gethostname()},
        sort_keys=True,
    )


EMBED_ARROW_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), False),
        pa.field(EMBEDDING, pa.list_(pa.field("element", pa.float32()))),
        pa.field(RAW_NORM, pa.float32()),
        pa.field(DETAIL, pa.string()),
        pa.field(TASK_RUNTIME, pa.string()),
    ]
)


def make_embed_batches(params: EmbedParams):
    """The mapInArrow function: Arrow batches of (image_id, bytes) -> (image_id, embedding, raw_norm, detail, task_runtime).

    ``task_runtime`` is set on the first row of each task only (where it ran), null elsewhere.
    """

    def embed_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        embedder = get_embedder(params, task_device(params))
        runtime: str | None = task_runtime(embedder, embedder.model_path)  # the copy it was opened from
        dim = params.spec.embedding_dim
        rows = failed_rows = 0
        first_reason = None
        for batch in batches:
            ids = batch.column(0)
            unit, norms, reasons = embed_images(batch.column(1).to_pylist(), params, embedder)
            failed = np.array([r is not None for r in reasons], dtype=bool)
            rows, failed_rows = rows + len(reasons), failed_rows + int(failed.sum())
            first_reason = first_reason or next((r for r in reasons if r is not None), None)
            flat = pa.array(unit.reshape(-1), type=pa.float32())
            offsets = pa.array(np.arange(0, (len(unit) + 1) * dim, dim, dtype=np.int32))
            embeddings = pa.ListArray.from_arrays(offsets, flat, mask=pa.array(failed))
            runtimes = [runtime] + [None] * (len(reasons) - 1) if len(reasons) else []
            runtime = None if len(reasons) else runtime
            yield pa.RecordBatch.from_arrays(
                [ids, embeddings, pa.array(norms, mask=failed), pa.array(reasons, type=pa.string()),
                 pa.array(runtimes, type=pa.string())],
                schema=EMBED_ARROW_SCHEMA,
            )
        check_failed_share(failed_rows, rows, first_reason, params)

    return embed_batches


def embed_dataframe(crops: DataFrame, params: EmbedParams) -> DataFrame:
    """Embed a DataFrame with ``image_id`` and ``bytes`` columns on the executors."""
    return crops.select(IMAGE_ID, BYTES).mapInArrow(make_embed_batches(params), EMBED_OUTPUT_SCHEMA)


def pending_ids(spark: SparkSession, cfg: ErsConfig, crops: DataFrame, params: EmbedParams) -> DataFrame | None:
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


def pending_crops(spark: SparkSession, cfg: ErsConfig, crops: DataFrame, params: EmbedParams) -> DataFrame:
    """The pending crops with their bytes: the id-only anti-joins of :func:`pending_ids`, then one semi-join
    that reads bytes only for the pending rows (adaptive execution broadcasts a small id set, so a re-run
    with little to do shuffles no bytes at all)."""
    ids = pending_ids(spark, cfg, crops, params)
    return crops if ids is None else crops.join(ids, IMAGE_ID, "left_semi")


ALIGN_OUTPUT_SCHEMA = StructType(
    [
        StructField(PARENT_IMAGE_ID, StringType(), False),
        StructField(FACE_INDEX, IntegerType(), True),
        StructField(BYTES, BinaryType(), True),
        StructField(DETAIL, StringType(), True),
    ]
)


NO_FACE_DETAIL = "no face detected"


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def align_one(data: bytes, size: int, min_side: int, embed_unaligned: bool) -> list[tuple[int | None, bytes | None, str | None]]:
    """One photo -> ``(face_index, chip PNG, detail)`` rows: one per detected face, else one fallback row.

    No face found: a centred resize with ``face_index`` null when ``embed_unaligned`` (the crop is
    a face crop the detector cannot re-find), else a ``no face detected`` row for quarantine.
    """
    from PIL import Image

    from ers_spark.models.align import align_faces, centred_resize

    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # bad bytes: this photo only
        return [(None, None, f"undecodable photo: {str(exc).splitlines()[0][:300]}")]
    # a missing dlib or landmark model raises ModelError here and fails the job
    chips = align_faces(rgb, size=size, min_side=min_side)
    if chips:
        return [(k, _png(chip), None) for k, chip in enumerate(chips)]
    if embed_unaligned:
        return [(None, _png(centred_resize(rgb, size)), None)]
    return [(None, None, NO_FACE_DETAIL)]


def make_align_batches(size: int, min_side: int, embed_unaligned: bool):
    """mapInPandas function: photos -> one aligned chip (PNG bytes) per detected face, a centred resize, or a reason."""

    def align_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            out = [
                (image_id, *row)
                for image_id, data in zip(pdf[IMAGE_ID], pdf[BYTES])
                for row in align_one(data, size, min_side, embed_unaligned)
            ]
            yield pd.DataFrame(out, columns=[PARENT_IMAGE_ID, FACE_INDEX, BYTES, DETAIL])

    return align_batches


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


def plan_embed(spark: SparkSession, cfg: ErsConfig) -> EmbedParams:
    """Check everything a job-level failure could come from before any Spark work, then ship the model."""
    params = EmbedParams.from_config(cfg)
    if params.device == "cuda" and spark.conf.get("spark.task.resource.gpu.amount", None) is None:
        raise ConfigError(
            "embed.device=cuda but Spark gives tasks no GPU: set spark.task.resource.gpu.amount "
            "(and spark.executor.resource.gpu.amount) or use embed.device=auto"
        )
    if params.backend == "onnx":
        check_onnxruntime(require_cuda=False)
        log.info("embed: ONNX Runtime on the driver: %s", onnxruntime_report())
    if cfg.embed.align:
        from ers_spark.models.align import require_dlib

        require_dlib()
    preflight_model(params)
    return ship_model(spark, params)


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
    run = StageRun(STAGE_NAME, params=params.loggable())
    align_counts: dict[str, int] = {}
    crops = read_table(spark, cfg, CROPS, hint="run `ers-spark ingest` first")
    if cfg.embed.align:
        align_counts = align_photos(spark, cfg, params.spec)
        # with alignment on, the model sees the aligned chips, not the whole photos
        crops = read_table(spark, cfg, CROPS).where(F.col(PARENT_IMAGE_ID).isNotNull())
    run.input_versions = {CROPS.name: table_version(spark, cfg, CROPS)}
    total = crops.count()
    pending = pending_crops(spark, cfg, crops, params)
    embedded = embed_dataframe(pending, params).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        totals = embedded.agg(F.count(F.lit(1)).alias("n"), F.count(DETAIL).alias("bad")).first()
        to_embed, quarantined = int(totals["n"]), int(totals["bad"])
        run.runtime = runtime_summary(embedded)
        if params.backend == "onnx":
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


def write_embeddings(spark: SparkSession, cfg: ErsConfig, params: EmbedParams, embedded: DataFrame,
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
