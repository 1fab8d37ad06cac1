"""Embed stage: crops -> embeddings (one L2-normalised float32 vector per image, plus its raw norm).

Inference runs on the executors that hold the crops, in Arrow batches
(``mapInArrow``): each Python worker opens the model once (ONNX Runtime, or
torch), decodes a whole batch, and runs it in sub-batches of
``embed.batch_size``. When Spark gave the task a GPU (``TaskContext``
resources ``gpu``), that device is used; otherwise the CPU. Only crops without
an embedding for the current model are embedded, so re-runs embed nothing.
A crop that cannot be decoded or embedded goes to quarantine with the reason;
it never fails the job.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
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
    SOURCE_PATH,
    STAGE,
    WIDTH,
)
from ers_spark.errors import ConfigError
from ers_spark.lake.tables import (
    StageRun,
    ensure_table,
    merge_insert_new,
    quarantine_rows,
    read_table,
    table_exists,
    table_path,
    table_version,
)
from ers_spark.models.spec import ModelSpec, file_sha256, load_model_spec, resolve_model_file

STAGE_NAME = "embed"

EMBED_OUTPUT_SCHEMA = StructType(
    [
        StructField(IMAGE_ID, StringType(), False),
        StructField(EMBEDDING, ArrayType(FloatType()), True),
        StructField(RAW_NORM, FloatType(), True),
        StructField(DETAIL, StringType(), True),
    ]
)


@dataclass(frozen=True)
class EmbedParams:
    """Everything an executor needs to embed a batch; small and picklable (the model travels by path)."""

    spec: ModelSpec
    model_path: str
    model_version: str
    backend: str
    device: str
    batch_size: int
    intra_op_threads: int
    fp16: bool

    @classmethod
    def from_config(cls, cfg: ErsConfig) -> "EmbedParams":
        """Resolve the model on the driver, so a missing file or bad checksum fails before any Spark work."""
        emb = cfg.embed
        spec = load_model_spec(emb.model)
        path = resolve_model_file(spec, os.path.expanduser(emb.model_cache_dir))
        digest = file_sha256(path)
        params = cls(
            spec=spec,
            model_path=str(path),
            model_version=f"{spec.version}+{digest[:12]}",
            backend=emb.backend,
            device=emb.device,
            batch_size=emb.batch_size,
            intra_op_threads=emb.intra_op_threads,
            fp16=emb.fp16,
        )
        params.validate()
        return params

    def validate(self) -> None:
        if self.backend not in ("onnx", "torch"):
            raise ConfigError(f"embed.backend must be 'onnx' or 'torch', got {self.backend!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"embed.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.batch_size < 1:
            raise ConfigError(f"embed.batch_size must be >= 1, got {self.batch_size}")
        if self.fp16 and self.backend != "torch":
            raise ConfigError("embed.fp16 needs embed.backend=torch (ONNX Runtime runs the fp32 graph)")

    def loggable(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.name
        return data


# one model per Python worker process, keyed by what makes it different
_EMBEDDERS: dict[tuple[Any, ...], Any] = {}


def task_device_id(device: str) -> int | None:
    """The CUDA device of this task: Spark's 'gpu' resource address (0 under CUDA_VISIBLE_DEVICES), or None."""
    if device == "cpu":
        return None
    from pyspark import TaskContext

    from ers_spark.models.onnx_runner import gpu_device_id_from_task

    ctx = TaskContext.get()
    gpus = ctx.resources().get("gpu") if ctx is not None else None
    addresses = list(gpus.addresses) if gpus is not None else None
    return gpu_device_id_from_task(addresses)


def get_embedder(params: EmbedParams, device_id: int | None) -> Any:
    """Load the model once per worker process (like predict_batch_udf's make_predict_fn)."""
    key = (params.model_path, params.backend, device_id, params.intra_op_threads, params.fp16)
    embedder = _EMBEDDERS.get(key)
    if embedder is None:
        if params.backend == "torch":
            from ers_spark.models.torch_runner import TorchEmbedder

            device = f"cuda:{device_id}" if device_id is not None else "cpu"
            embedder = TorchEmbedder(params.model_path, params.spec, device=device, fp16=params.fp16)
        else:
            from ers_spark.models.onnx_runner import OnnxEmbedder

            embedder = OnnxEmbedder(
                params.model_path, params.spec, device_id=device_id, intra_op_threads=params.intra_op_threads
            )
        _EMBEDDERS[key] = embedder
    return embedder


def embed_images(images: list[bytes | None], params: EmbedParams, embedder: Any) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Decode and embed one batch of encoded images.

    Returns unit embeddings and raw norms for every input row (NaN rows where
    it failed) and one failure reason per row (None when it worked). A failure
    of a whole sub-batch is retried image by image, so one bad image cannot
    take its neighbours down with it.
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
        try:
            unit[chunk], norms[chunk] = embedder.embed(sub)
        except Exception:  # noqa: BLE001 - isolate the failing image(s), never fail the job
            for j, row in enumerate(chunk):
                try:
                    u, r = embedder.embed(sub[j : j + 1])
                    unit[row], norms[row] = u[0], r[0]
                except Exception as exc:  # noqa: BLE001
                    reasons[row] = f"inference failed: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"
    bad = ~np.isfinite(norms) | (norms <= 0)
    for row in np.flatnonzero(bad & np.array([r is None for r in reasons])):
        reasons[row] = "model returned a zero or non-finite embedding"
    return unit, norms, reasons


def make_embed_batches(params: EmbedParams):
    """The mapInArrow function: Arrow batches of (image_id, bytes) -> (image_id, embedding, raw_norm, detail)."""

    def embed_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        embedder = get_embedder(params, task_device_id(params.device))
        dim = params.spec.embedding_dim
        for batch in batches:
            ids = batch.column(0)
            unit, norms, reasons = embed_images(batch.column(1).to_pylist(), params, embedder)
            failed = np.array([r is not None for r in reasons], dtype=bool)
            flat = pa.array(unit.reshape(-1), type=pa.float32())
            offsets = pa.array(np.arange(0, (len(unit) + 1) * dim, dim, dtype=np.int32))
            embeddings = pa.ListArray.from_arrays(offsets, flat, mask=pa.array(failed))
            yield pa.RecordBatch.from_arrays(
                [ids, embeddings, pa.array(norms, mask=failed), pa.array(reasons, type=pa.string())],
                schema=pa.schema(
                    [
                        pa.field(IMAGE_ID, pa.string(), False),
                        pa.field(EMBEDDING, pa.list_(pa.field("element", pa.float32()))),
                        pa.field(RAW_NORM, pa.float32()),
                        pa.field(DETAIL, pa.string()),
                    ]
                ),
            )

    return embed_batches


def embed_dataframe(crops: DataFrame, params: EmbedParams) -> DataFrame:
    """Embed a DataFrame with ``image_id`` and ``bytes`` columns on the executors."""
    return crops.select(IMAGE_ID, BYTES).mapInArrow(make_embed_batches(params), EMBED_OUTPUT_SCHEMA)


def pending_crops(spark: SparkSession, cfg: ErsConfig, crops: DataFrame, params: EmbedParams) -> DataFrame:
    """Crops with no embedding for this model version yet and not already quarantined by embed (incremental runs)."""
    if table_exists(spark, cfg, QUARANTINE):
        failed = (
            spark.read.format("delta").load(table_path(cfg, QUARANTINE)).where(F.col(STAGE) == STAGE_NAME).select(IMAGE_ID)
        )
        crops = crops.join(failed, IMAGE_ID, "left_anti")
    if not table_exists(spark, cfg, EMBEDDINGS):
        return crops
    done = (
        spark.read.format("delta")
        .load(table_path(cfg, EMBEDDINGS))
        .where((F.col(MODEL_NAME) == params.spec.name) & (F.col(MODEL_VERSION) == params.model_version))
        .select(IMAGE_ID)
    )
    return crops.join(done, IMAGE_ID, "left_anti")


ALIGN_OUTPUT_SCHEMA = StructType(
    [
        StructField(PARENT_IMAGE_ID, StringType(), False),
        StructField(FACE_INDEX, IntegerType(), True),
        StructField(BYTES, BinaryType(), True),
        StructField(DETAIL, StringType(), True),
    ]
)


def make_align_batches(size: int):
    """mapInPandas function: photos -> one aligned chip (PNG bytes) per detected face, or a reason."""

    def align_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from PIL import Image

        from ers_spark.models.align import align_faces

        for pdf in batches:
            out: list[tuple[str, int | None, bytes | None, str | None]] = []
            for image_id, data in zip(pdf[IMAGE_ID], pdf[BYTES]):
                try:
                    with Image.open(io.BytesIO(data)) as img:
                        rgb = np.asarray(img.convert("RGB"))
                    chips = align_faces(rgb, size=size)
                except Exception as exc:  # noqa: BLE001 - one bad photo must not fail the job
                    out.append((image_id, None, None, f"alignment failed: {str(exc).splitlines()[0][:300]}"))
                    continue
                if not chips:
                    out.append((image_id, None, None, "no face detected"))
                for k, chip in enumerate(chips):
                    buf = io.BytesIO()
                    Image.fromarray(chip).save(buf, format="PNG")
                    out.append((image_id, k, buf.getvalue(), None))
            yield pd.DataFrame(out, columns=[PARENT_IMAGE_ID, FACE_INDEX, BYTES, DETAIL])

    return align_batches


def align_photos(spark: SparkSession, cfg: ErsConfig, spec: ModelSpec) -> dict[str, int]:
    """Cut aligned chips out of photos not aligned yet; chips become crops rows (parent id + face index).

    Photos are the crops rows without a parent; each face becomes a new crop whose
    image_id is the sha256 of the chip's PNG bytes. A photo with no face goes to
    quarantine (reason ``no_face``). Already-aligned photos are skipped on re-runs.
    """
    crops = read_table(spark, cfg, CROPS)
    photos = crops.where(F.col(PARENT_IMAGE_ID).isNull())
    done = crops.where(F.col(PARENT_IMAGE_ID).isNotNull()).select(F.col(PARENT_IMAGE_ID).alias(IMAGE_ID))
    if table_exists(spark, cfg, QUARANTINE):
        no_face = (
            spark.read.format("delta").load(table_path(cfg, QUARANTINE))
            .where((F.col(STAGE) == "align") & (F.col(REASON) == REASON_NO_FACE))
            .select(IMAGE_ID)
        )
        done = done.unionByName(no_face)
    todo = photos.join(done.distinct(), IMAGE_ID, "left_anti")
    aligned = (
        todo.select(IMAGE_ID, BYTES)
        .mapInPandas(make_align_batches(spec.input_width), ALIGN_OUTPUT_SCHEMA)
        .join(todo.select(F.col(IMAGE_ID).alias(PARENT_IMAGE_ID), SOURCE_PATH, IDENTITY), PARENT_IMAGE_ID)
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    try:
        chips = aligned.where(F.col(DETAIL).isNull()).select(
            F.sha2(F.col(BYTES), 256).alias(IMAGE_ID),
            PARENT_IMAGE_ID,
            FACE_INDEX,
            F.concat(F.col(SOURCE_PATH), F.lit("#face"), F.col(FACE_INDEX).cast("string")).alias(SOURCE_PATH),
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
            F.lit(REASON_NO_FACE),
            F.col(DETAIL),
        )
        new_chips = merge_insert_new(spark, cfg, CROPS, chips)
        no_faces = merge_insert_new(spark, cfg, QUARANTINE, failed)
    finally:
        aligned.unpersist()
    return {"chips_written": new_chips, "photos_without_face": no_faces}


def run_embed(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Run the embed stage; counts: to_embed = written + quarantined, crops = to_embed + already_embedded."""
    params = EmbedParams.from_config(cfg)
    if params.device == "cuda" and spark.conf.get("spark.task.resource.gpu.amount", None) is None:
        raise ConfigError(
            "embed.device=cuda but Spark gives tasks no GPU: set spark.task.resource.gpu.amount "
            "(and spark.executor.resource.gpu.amount) or use embed.device=auto"
        )
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
        now = F.current_timestamp()
        good = embedded.where(F.col(DETAIL).isNull()).select(
            IMAGE_ID,
            EMBEDDING,
            RAW_NORM,
            F.lit(params.spec.name).alias(MODEL_NAME),
            F.lit(params.model_version).alias(MODEL_VERSION),
            now.alias(EMBEDDED_AT),
        )
        bad = quarantine_rows(
            embedded.where(F.col(DETAIL).isNotNull()).join(pending.select(IMAGE_ID, SOURCE_PATH), IMAGE_ID),
            STAGE_NAME,
            F.lit(REASON_EMBED_FAILED),
            F.col(DETAIL),
        )
        totals = embedded.agg(F.count(F.lit(1)).alias("n"), F.count(DETAIL).alias("bad")).first()
        to_embed, quarantined = int(totals["n"]), int(totals["bad"])
        properties = {"ers.model_name": params.spec.name, "ers.model_version": params.model_version}
        ensure_table(spark, cfg, EMBEDDINGS, properties=properties)
        written = merge_insert_new(spark, cfg, EMBEDDINGS, good) if to_embed > quarantined else 0
        if quarantined:
            merge_insert_new(spark, cfg, QUARANTINE, bad)
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
    print(f"embed: {to_embed} new crops to embed ({total - to_embed} already embedded with {params.spec.name} {params.model_version})")
    return run.finish(spark, cfg, outputs=(EMBEDDINGS, QUARANTINE))
