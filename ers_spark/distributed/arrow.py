"""Arrow helpers for the Python workers: embedding columns as numpy matrices and back, without a row loop."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from pyspark.sql import DataFrame

from ers_spark.core.ers import normalize_rows
from ers_spark.errors import ErsUserError
from ers_spark.lake.contracts import EMBEDDING, IMAGE_ID

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]


def arrow_matrix(col: pa.Array | pa.ChunkedArray) -> F32:
    """A list<float> Arrow column of equal-length rows as an (n, d) float32 matrix (no Python loop)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(col)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if values.size % n:
        raise ErsUserError("embeddings of different lengths in one table; re-embed with one model")
    return values.reshape(n, values.size // n)


def arrow_lists(x: npt.NDArray[Any], value_type: pa.DataType) -> pa.Array:
    """An (n, d) matrix as an Arrow list array (the Spark array<...> layout)."""
    n, d = x.shape
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32) if n else np.zeros(1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(x).ravel(), type=value_type))


def to_numpy(df: DataFrame) -> tuple[list[str], F32]:
    """Collect (image_id, embedding) rows as ids and a unit float32 matrix (via Arrow, no row loop)."""
    table = df.select(IMAGE_ID, EMBEDDING).toArrow()
    ids = table.column(IMAGE_ID).to_pylist()
    x = arrow_matrix(table.column(EMBEDDING))
    return ids, (normalize_rows(x) if x.shape[0] else x)
