"""An input folder listed and read on the executors: the driver never holds a list of every file.

Spark's file sources (``binaryFile`` among them) keep an index of every input file on the driver, and
``inputFiles`` hands it to Python: at a billion loose crops that is a billion paths in one process. Here
the driver starts from one row, the input path; each round lists one level of folders in the Python
workers (pyarrow's file systems: local paths, ``s3a://`` with the session's S3A settings, and whatever
else ``pyarrow.fs`` opens, e.g. ``hdfs://``), writes the files it found to a reliable checkpoint and hands
the sub-folders to the next round; only the number of folders per round reaches the driver. The bytes are
then read by the executors from those rows, in Arrow batches. A zero-length file is listed like any other
(Spark's scan skips them, SPARK-26161), so ingest quarantines it from its row, not from a driver-side diff.

Paths are written as Spark writes them (``file:/abs/path``, ``s3a://bucket/key``), so stored
``source_path`` values do not depend on which reader listed them. Hidden names (``.x``, ``_x``) are
skipped, as Spark skips them.
"""

from __future__ import annotations

import functools
import posixpath
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from ers_spark.errors import ConfigError

PATH = "path"
LENGTH = "length"
CONTENT = "content"
_IS_DIR = "_is_dir"
MAX_DEPTH = 64  # folder levels listed before the listing stops with an error (a link cycle, not a dataset)
READ_BATCH_ROWS = 64  # files read per Arrow batch (images of ~100 KB: a few MB a batch)
S3A_SETTINGS = {  # Spark's S3A settings -> pyarrow.fs.S3FileSystem arguments
    "spark.hadoop.fs.s3a.endpoint": "endpoint_override",
    "spark.hadoop.fs.s3a.endpoint.region": "region",
    "spark.hadoop.fs.s3a.access.key": "access_key",
    "spark.hadoop.fs.s3a.secret.key": "secret_key",
    "spark.hadoop.fs.s3a.session.token": "session_token",
}


@dataclass(frozen=True)
class StoreSettings:
    """The object-store settings the executors open ``s3a://`` paths with (from the session's S3A settings;
    unset ones fall to pyarrow's own chain: environment, ``~/.aws``, the instance's role)."""

    s3: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_session(cls, spark: SparkSession) -> "StoreSettings":
        found = {arg: spark.conf.get(key, None) for key, arg in S3A_SETTINGS.items()}
        return cls(s3=tuple(sorted((k, v) for k, v in found.items() if v)))

    def s3_arguments(self) -> dict[str, str]:
        args = dict(self.s3)
        endpoint = args.get("endpoint_override")
        if endpoint and "://" in endpoint:  # pyarrow wants host:port and the scheme apart
            scheme, _, host = endpoint.partition("://")
            args.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        return args


def open_store(uri: str, settings: StoreSettings) -> tuple[pafs.FileSystem, str, Callable[[str], str]]:
    """(file system, the path in it, a function from a path in it back to a Spark-style URI).

    The file system of a scheme and host is made once per Python worker (:func:`_filesystem`), not per file.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        local = parsed.path if parsed.scheme else uri
        return pafs.LocalFileSystem(), posixpath.abspath(local), lambda p: "file:" + p
    try:
        fs = _filesystem(parsed.scheme, parsed.netloc, settings)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise ConfigError(f"ingest.input_path {uri}: the executors cannot open {parsed.scheme}:// paths ({err}); "
                          "use a local, s3a:// or hdfs:// path") from None
    if parsed.scheme in ("s3a", "s3"):
        scheme = parsed.scheme
        return fs, (parsed.netloc + parsed.path).rstrip("/"), lambda p: f"{scheme}://{p}"
    prefix = f"{parsed.scheme}://{parsed.netloc}"
    return fs, parsed.path, lambda p: prefix + (p if p.startswith("/") else "/" + p)


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, netloc: str, settings: StoreSettings) -> pafs.FileSystem:
    if scheme in ("s3a", "s3"):
        return pafs.S3FileSystem(**settings.s3_arguments())
    return pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")[0]


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _list_level(settings: StoreSettings, suffixes: tuple[str, ...]):
    """mapInArrow function: each folder (or file) URI -> its files (matching ``suffixes``) and its sub-folders."""

    def list_level(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            paths: list[str] = []
            sizes: list[int] = []
            dirs: list[bool] = []
            for uri in batch.column(0).to_pylist():  # one listing call per folder; its entries come back as one list
                fs, path, to_uri = open_store(uri, settings)
                info = fs.get_file_info(path)
                if info.type == pafs.FileType.NotFound:
                    raise FileNotFoundError(f"No such file or directory: {uri}")
                entries = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(path))
                for entry in entries:
                    if entry is not info and _hidden(entry.base_name):
                        continue
                    is_dir = entry.type == pafs.FileType.Directory
                    if not is_dir and entry.extension.lower() not in suffixes:
                        continue
                    paths.append(to_uri(entry.path))
                    sizes.append(0 if is_dir else int(entry.size or 0))
                    dirs.append(is_dir)
            yield pa.RecordBatch.from_arrays([pa.array(paths, pa.string()), pa.array(sizes, pa.int64()),
                                              pa.array(dirs, pa.bool_())], names=[PATH, LENGTH, _IS_DIR])

    return list_level


def list_files(spark: SparkSession, root: str, suffixes: tuple[str, ...], recursive: bool,
               settings: StoreSettings | None = None) -> DataFrame:
    """(``path``, ``length``) of every file under ``root`` whose extension is in ``suffixes``, listed on the executors.

    One Spark job per folder level; the files of each level are checkpointed, so a later read of the listing
    does not list again (and sees the same files). Raises ConfigError for a scheme the executors cannot open.
    """
    from ers_spark.lake.tables import materialize_source

    settings = StoreSettings.from_session(spark) if settings is None else settings
    open_store(root, settings)  # an unknown scheme stops here, before any job
    level = spark.createDataFrame([(root,)], f"{PATH} string")
    found: list[DataFrame] = []
    parallelism = max(1, int(spark.conf.get("spark.sql.shuffle.partitions", "200")))
    for _ in range(MAX_DEPTH):
        entries = materialize_source(level.mapInArrow(_list_level(settings, tuple(suffixes)),
                                                      f"{PATH} string, {LENGTH} long, {_IS_DIR} boolean"))
        found.append(entries.where(~F.col(_IS_DIR)).select(PATH, LENGTH))
        if not recursive:
            break
        level = entries.where(F.col(_IS_DIR)).select(PATH)
        folders = level.count()
        if folders == 0:
            break
        level = level.repartition(min(folders, parallelism), PATH)
    else:
        raise ConfigError(f"ingest.input_path {root}: more than {MAX_DEPTH} folder levels (a link cycle?)")
    files = found[0]
    for more in found[1:]:
        files = files.unionByName(more)
    return files


def read_partitions(spark: SparkSession, files: DataFrame) -> int:
    """Tasks to read ``files`` in, as Spark packs a file scan: bytes plus an open cost per file, per
    ``spark.sql.files.maxPartitionBytes`` (one aggregate: two numbers reach the driver)."""
    row = files.agg(F.count(F.lit(1)).alias("n"), F.coalesce(F.sum(LENGTH), F.lit(0)).alias("bytes")).first()
    open_cost = _bytes(spark.conf.get("spark.sql.files.openCostInBytes", "4194304"))
    per_task = _bytes(spark.conf.get("spark.sql.files.maxPartitionBytes", "134217728"))
    return max(1, -(-(int(row["bytes"]) + int(row["n"]) * open_cost) // per_task))


def _bytes(setting: str) -> int:
    """A Spark size setting (``134217728``, ``128m``, ``4MB``) in bytes."""
    text = setting.strip().lower().rstrip("b")
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def read_files(files: DataFrame, settings: StoreSettings, partitions: int) -> DataFrame:
    """(``path``, ``length``, ``content``): each listed file's bytes, read on the executors.

    A file gone since the listing fails the task with ``FileNotFoundError: No such file: <uri>`` (the
    job then stops in one line, :func:`ers_spark.errors.storage_error_from_job`).
    """

    def read(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            uris = batch.column(0).to_pylist()
            for start in range(0, len(uris), READ_BATCH_ROWS):
                chunk = uris[start:start + READ_BATCH_ROWS]
                contents = [_read_one(uri, settings) for uri in chunk]
                yield pa.RecordBatch.from_arrays(
                    [pa.array(chunk, pa.string()), batch.column(1).slice(start, len(chunk)),
                     pa.array(contents, pa.binary())], names=[PATH, LENGTH, CONTENT])

    spread = files.repartition(max(1, partitions), PATH)
    return spread.select(PATH, LENGTH).mapInArrow(read, f"{PATH} string, {LENGTH} long, {CONTENT} binary")


def _read_one(uri: str, settings: StoreSettings) -> bytes:
    fs, path, _ = open_store(uri, settings)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"No such file: {uri}") from None
