"""Embedding on the executors, the distributed side of :mod:`ers_spark.models` (ONNX Runtime or torch):
the model resolved on the driver and shipped through Spark, one model per Python worker, and the
``mapInArrow`` function that decodes and embeds Arrow batches of crops.

Each Python worker opens the model once (ONNX Runtime, or torch) from the copy Spark shipped to its
executor, decodes a whole batch, and runs it in sub-batches of ``embed.batch_size``. When Spark gave
the task a GPU (``TaskContext`` resources ``gpu``), that device is used; otherwise the CPU. When the model's
spec declares an alignment (``embed.align: auto``), each crop is aligned in the same pass
(:mod:`ers_spark.distributed.align`). A crop whose bytes do not decode, or whose embedding comes out zero or
non-finite, gets a reason; an exception of the model itself, or a partition where most crops fail, fails
the task.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import ArrayType, BooleanType, FloatType, IntegerType, StringType, StructField, StructType

from ers_spark.config import EmbedConfig
from ers_spark.distributed.align import NO_FACE_DETAIL, align_images
from ers_spark.errors import ConfigError, ModelError
from ers_spark.lake.contracts import ALIGNED, BYTES, DETAIL, EMBEDDING, IMAGE_ID, RAW_NORM
from ers_spark.models.devices import task_cuda_index
from ers_spark.models.spec import FaceAlignment, ModelSpec, file_sha256, load_model_spec, resolve_model_file

log = logging.getLogger(__name__)

TASK_RUNTIME = "task_runtime"
FACES_FOUND = "faces_found"

EMBED_OUTPUT_SCHEMA = StructType(
    [
        StructField(IMAGE_ID, StringType(), False),
        StructField(EMBEDDING, ArrayType(FloatType()), True),
        StructField(RAW_NORM, FloatType(), True),
        StructField(DETAIL, StringType(), True),
        StructField(TASK_RUNTIME, StringType(), True),
        StructField(ALIGNED, BooleanType(), True),
        StructField(FACES_FOUND, IntegerType(), True),
    ]
)


# Below this share of failed rows a partition is data with some bad crops; above it, a broken model or executor.
MIN_ROWS_FOR_FAILED_SHARE = 10


@dataclass(frozen=True)
class ModelFile:
    """The model embed runs, resolved on the driver from ``embed.model``; small and picklable.

    The model travels through Spark itself: :func:`ship_model` registers the file with
    ``SparkSession.addArtifacts(file=True)`` (classic and Spark Connect sessions alike) under ``shipped_name``
    and every executor reads its own copy
    (checked against ``model_sha256``); ``model_path`` is the driver's file. How the executors run
    it (backend, device, batch size, ...) is ``embed.*`` itself (:class:`~ers_spark.config.EmbedConfig`).
    """

    spec: ModelSpec
    model_path: str
    model_sha256: str
    model_version: str
    shipped_name: str | None = None
    alignment: FaceAlignment | None = None


def resolve_alignment(spec: ModelSpec, emb: EmbedConfig) -> FaceAlignment | None:
    """The alignment embed applies: the spec's under ``embed.align: auto`` (or ``true``), none under ``false``."""
    if emb.align is False:
        return None
    if spec.alignment is None and emb.align is True:
        raise ConfigError(
            f"embed.align=true but model {spec.name!r} declares no alignment: add `alignment: {{method: dlib_chip}}` "
            "(or five_point_template) to its spec, or use embed.align=auto"
        )
    return spec.alignment


def resolve_model(emb: EmbedConfig) -> ModelFile:
    """Resolve the model on the driver, so a missing file or bad checksum fails before any Spark work.

    The model version names the file (its sha256) and the alignment, so embeddings of aligned chips and
    of whole crops never share a version (switching ``embed.align`` embeds again).
    """
    spec = load_model_spec(emb.model)
    if spec.torch_path is not None and emb.backend != "torch":
        raise ConfigError(f"model {spec.name!r} is a PyTorch file (model.torch_path={spec.torch_path}), which ONNX "
                          "Runtime cannot run: set embed.backend=torch")
    path = resolve_model_file(spec, os.path.expanduser(emb.model_cache_dir))
    digest = file_sha256(path)
    alignment = resolve_alignment(spec, emb)
    return ModelFile(spec=spec, model_path=str(path), model_sha256=digest,
                     model_version=model_version(spec, digest, emb, alignment), alignment=alignment)


def model_version(spec: ModelSpec, digest: str, emb: EmbedConfig, alignment: FaceAlignment | None) -> str:
    """What made an embedding, so embeddings of two ways of running one model never share a version: the spec's
    version, the file's sha256, the backend and its precision, and the alignment.

    >>> from ers_spark.config import load_config
    >>> from ers_spark.models.spec import load_model_spec
    >>> spec, emb = load_model_spec("dlib_resnet_v1"), load_config().embed
    >>> model_version(spec, "ab" * 32, emb, spec.alignment)
    '1+abababababab+onnx-fp32+dlib_chip150p0.25'
    >>> model_version(spec, "ab" * 32, load_config(overrides=["embed.backend=torch", "embed.fp16=true"]).embed, None)
    '1+abababababab+torch-fp16'
    """
    precision = "fp16" if emb.fp16 else "fp32"
    return (f"{spec.version}+{digest[:12]}+{emb.backend}-{precision}"
            + (f"+{alignment.tag(spec.input_width)}" if alignment else ""))


def ship_model(spark: SparkSession, params: ModelFile) -> ModelFile:
    """Send the model file to every executor through Spark, as a session artifact (``addArtifacts(file=True)``:
    what a Spark Connect client can do too, unlike ``SparkContext.addFile``), under a content-addressed name.

    The name carries the sha256, so a changed model never collides with a copy an
    executor already holds; executors fetch it once into their own work directory.
    """
    name = f"{params.spec.name}-{params.model_sha256[:16]}{Path(params.model_path).suffix or '.onnx'}"
    beside_model = Path(params.model_path).parent / "shipped"
    try:
        staged = stage_copy(params.model_path, beside_model / name)
    except OSError as exc:  # a read-only model mount (a Kubernetes volume): stage in the driver's temp folder
        fallback = Path(tempfile.gettempdir()) / "ers-spark-shipped" / name
        log.info("embed: %s is not writable (%s); staging the model copy at %s", beside_model, exc.strerror, fallback)
        try:
            staged = stage_copy(params.model_path, fallback)
        except OSError as again:
            raise ModelError(
                f"cannot stage the model for shipping: neither {beside_model} nor {fallback.parent} is writable "
                f"({again.strerror}); set TMPDIR to a writable folder on the driver"
            ) from None
    spark.addArtifacts(str(staged), file=True)  # a second add of the same bytes is a no-op
    return replace(params, shipped_name=name)


def stage_copy(source: str, staged: Path) -> Path:
    """Copy ``source`` to ``staged`` once (atomically: a concurrent job never ships half a file)."""
    if not staged.is_file():
        staged.parent.mkdir(parents=True, exist_ok=True)
        tmp = staged.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, staged)
    return staged


def local_model_path(params: ModelFile) -> str:
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


def preflight_model(params: ModelFile, emb: EmbedConfig) -> None:
    """Open the model on the driver's CPU and embed two blank images, so a broken model fails the job at once.

    Catches a corrupt file, a wrong input shape and a wrong output dimension before any
    Spark work; what only an executor can see (its CUDA) is checked in the task.
    """
    from ers_spark.models.preprocess import prepare_arrays

    spec = params.spec
    blank = [np.full((spec.input_height, spec.input_width, 3), 128, np.uint8)] * 2
    embedder = open_embedder(params, emb, params.model_path, device_id=None)
    unit, norms = embedder.embed(prepare_arrays(blank, spec))
    if not np.isfinite(unit).all() or not np.isfinite(norms).all():
        raise ModelError(f"model {params.model_path} returns non-finite embeddings for a blank image; it is broken")


# the model this Python worker holds: (what makes it different, the embedder); one at a time
_EMBEDDER: list[tuple[tuple[Any, ...], Any]] = []


def task_device(emb: EmbedConfig) -> int | None:
    """The CUDA index for this task (None: CPU); ``embed.device=cuda`` without a GPU fails the task."""
    if emb.device == "cpu":
        return None
    device_id = task_cuda_index()
    if device_id is None and emb.device == "cuda":
        raise ModelError(
            "embed.device=cuda but Spark gave this task no GPU: set spark.executor.resource.gpu.amount, "
            "spark.task.resource.gpu.amount and a discovery script (deploy/spark/gpu_discovery.sh)"
        )
    return device_id


def open_embedder(params: ModelFile, emb: EmbedConfig, model_path: str, device_id: int | None) -> Any:
    """An embedder with its session or module already loaded (so load failures are job failures)."""
    require_gpu = emb.device == "cuda"
    if emb.backend == "torch":
        from ers_spark.models.torch_runner import TorchEmbedder

        device = f"cuda:{device_id}" if device_id is not None else "cpu"
        embedder = TorchEmbedder(model_path, params.spec, device=device, fp16=emb.fp16)
        if device_id is not None and not require_gpu and not _torch_cuda_available():
            log.warning("GPU %s given to the task but torch sees no CUDA; running on CPU", device_id)
            embedder = TorchEmbedder(model_path, params.spec, device="cpu", fp16=emb.fp16)
        _ = embedder.module
        return embedder
    from ers_spark.models.onnx_runner import OnnxEmbedder

    embedder = OnnxEmbedder(
        model_path, params.spec, device_id=device_id, intra_op_threads=emb.intra_op_threads, require_gpu=require_gpu
    )
    _ = embedder.session
    return embedder


def _torch_cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def get_embedder(params: ModelFile, emb: EmbedConfig, device_id: int | None) -> Any:
    """Load the model once per worker process (like predict_batch_udf's make_predict_fn), and hold one only.

    Spark reuses a Python worker for later tasks, which may get another GPU (or another model): the worker
    keeps the model of its current task's device and drops the one it held before loading the next, so it
    never holds sessions (and their memory) on several devices.
    """
    key = (params.shipped_name or params.model_path, params.model_sha256, emb.backend, device_id,
           emb.intra_op_threads, emb.fp16, emb.device)
    if _EMBEDDER and _EMBEDDER[0][0] == key:
        return _EMBEDDER[0][1]
    _EMBEDDER.clear()  # free the old session before the new one takes memory
    embedder = open_embedder(params, emb, local_model_path(params), device_id)
    _EMBEDDER.append((key, embedder))
    return embedder


@dataclass
class EmbeddedBatch:
    """One batch's results, row for row: unit embeddings and raw norms (NaN where it failed), the reason a
    row failed (None when it worked), and, when aligning, whether a face was found and how many."""

    unit: np.ndarray
    norms: np.ndarray
    reasons: list[str | None]
    aligned: np.ndarray | None = None
    faces: np.ndarray | None = None


def decode_or_align(images: list[bytes | None], params: ModelFile, emb: EmbedConfig):
    """Per row a uint8 image ready for the model (None where there is none), its reason, and alignment facts."""
    from ers_spark.models.preprocess import decode_images

    if params.alignment is None:
        decoded, reasons = decode_images(images, params.spec)
        return decoded, reasons, None, None
    batch = align_images(images, params.alignment, params.spec.input_width, emb.align_min_side,
                         emb.no_face == "embed_unaligned")
    return batch.chips, batch.reasons, batch.aligned, batch.faces


def embed_images(images: list[bytes | None], params: ModelFile, emb: EmbedConfig, embedder: Any) -> EmbeddedBatch:
    """Decode (and align) and embed one batch of encoded images.

    Only per-image problems become reasons: bytes that do not decode, no face under
    ``embed.no_face: quarantine``, or an embedding that comes out zero or non-finite. An exception
    of the model itself is a broken job, not bad data, and propagates.
    """
    from ers_spark.models.preprocess import prepare_arrays

    n = len(images)
    unit = np.full((n, params.spec.embedding_dim), np.nan, dtype=np.float32)
    norms = np.full(n, np.nan, dtype=np.float32)
    decoded, reasons, aligned, faces = decode_or_align(images, params, emb)
    rows = np.array([i for i, arr in enumerate(decoded) if arr is not None], dtype=np.int64)
    for start in range(0, len(rows), emb.batch_size):
        chunk = rows[start : start + emb.batch_size]
        # float conversion per sub-batch: a small working set that stays in cache
        sub = prepare_arrays([decoded[row] for row in chunk], params.spec)
        unit[chunk], norms[chunk] = embedder.embed(sub)
    bad = ~np.isfinite(norms) | (norms <= 0)
    for row in np.flatnonzero(bad & np.array([r is None for r in reasons])):
        reasons[row] = "model returned a zero or non-finite embedding"
    return EmbeddedBatch(unit, norms, reasons, aligned, faces)


def check_failed_share(failed: int, rows: int, first_reason: str | None, emb: EmbedConfig) -> None:
    """Fail the task when most of a partition failed: that is a broken model or executor, not bad data."""
    if rows >= MIN_ROWS_FOR_FAILED_SHARE and failed > emb.max_failed_share * rows:
        raise ModelError(
            f"{failed} of {rows} crops in one partition failed to embed (first: {first_reason}); more than "
            f"embed.max_failed_share={emb.max_failed_share}: the model or this executor is broken, not the data"
        )


def task_runtime(embedder: Any, model_path: str) -> str:
    """One JSON line describing where this task ran: device, model copy, code origin, host."""
    import socket

    from ers_spark.models.devices import task_gpu_addresses

    return json.dumps(
        {"device": embedder.runtime, "model_path": os.path.abspath(model_path), "code": os.path.abspath(__file__),
         "host": socket.gethostname(), "gpus": task_gpu_addresses() or []},
        sort_keys=True,
    )


EMBED_ARROW_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), False),
        pa.field(EMBEDDING, pa.list_(pa.field("element", pa.float32()))),
        pa.field(RAW_NORM, pa.float32()),
        pa.field(DETAIL, pa.string()),
        pa.field(TASK_RUNTIME, pa.string()),
        pa.field(ALIGNED, pa.bool_()),
        pa.field(FACES_FOUND, pa.int32()),
    ]
)


def make_embed_batches(params: ModelFile, emb: EmbedConfig, device_id: int | None = None):
    """The mapInArrow function: Arrow batches of (image_id, bytes) -> (image_id, embedding, raw_norm, detail,
    task_runtime, aligned, faces_found).

    The device is the GPU Spark gave the task (:func:`task_device`); ``device_id`` names a CUDA device
    instead, for running the function outside Spark (``bench/gpu.py`` on a machine without Java).

    ``task_runtime`` is set on the first row of each task only (where it ran), null elsewhere; ``aligned`` and
    ``faces_found`` are null when embed does not align. A crop without a face under ``no_face: quarantine``
    is the data's verdict, not a failure: it does not count towards ``embed.max_failed_share``.
    """

    def embed_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        embedder = get_embedder(params, emb, task_device(emb) if device_id is None else device_id)
        runtime: str | None = task_runtime(embedder, embedder.model_path)  # the copy it was opened from
        dim = params.spec.embedding_dim
        rows = failed_rows = 0
        first_reason = None
        for batch in batches:
            ids = batch.column(0)
            out = embed_images(batch.column(1).to_pylist(), params, emb, embedder)
            failed = np.array([r is not None for r in out.reasons], dtype=bool)
            broken = [r for r in out.reasons if r is not None and r != NO_FACE_DETAIL]
            rows, failed_rows = rows + len(out.reasons), failed_rows + len(broken)
            first_reason = first_reason or next(iter(broken), None)
            flat = pa.array(out.unit.reshape(-1), type=pa.float32())
            offsets = pa.array(np.arange(0, (len(out.unit) + 1) * dim, dim, dtype=np.int32))
            embeddings = pa.ListArray.from_arrays(offsets, flat, mask=pa.array(failed))
            runtimes = [runtime] + [None] * (len(out.reasons) - 1) if len(out.reasons) else []
            runtime = None if len(out.reasons) else runtime
            nulls = pa.nulls(len(out.reasons))
            yield pa.RecordBatch.from_arrays(
                [ids, embeddings, pa.array(out.norms, mask=failed), pa.array(out.reasons, type=pa.string()),
                 pa.array(runtimes, type=pa.string()),
                 nulls.cast(pa.bool_()) if out.aligned is None else pa.array(out.aligned, mask=failed),
                 nulls.cast(pa.int32()) if out.faces is None else pa.array(out.faces, type=pa.int32())],
                schema=EMBED_ARROW_SCHEMA,
            )
        check_failed_share(failed_rows, rows, first_reason, emb)

    return embed_batches


def embed_dataframe(crops: DataFrame, params: ModelFile, emb: EmbedConfig, profile: Any = None) -> DataFrame:
    """Embed a DataFrame with ``image_id`` and ``bytes`` columns on the executors; under ``profile`` (a Spark
    ResourceProfile, :func:`~ers_spark.distributed.gpu_profile.embed_resource_profile`) when given, so only
    these tasks ask for GPUs."""
    return crops.select(IMAGE_ID, BYTES).mapInArrow(make_embed_batches(params, emb), EMBED_OUTPUT_SCHEMA,
                                                    profile=profile)
