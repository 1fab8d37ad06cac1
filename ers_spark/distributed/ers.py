"""ERS and the UIC on Spark, the distributed side of :mod:`ers_spark.core.ers`: the members' sum that
becomes the UIC (summed on the executors), ``1 - <f_UI, f>`` as a Spark expression and the
ERS-enhanced features per Arrow batch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, FloatType

from ers_spark.core import ers as ers_math
from ers_spark.core.ers import normalize_rows
from ers_spark.distributed.arrow import F64, arrow_lists, arrow_matrix
from ers_spark.lake.contracts import EMBEDDING


def member_sums(df: DataFrame) -> tuple[F64, int]:
    """Sum of the unit embeddings of ``df`` (column ``embedding``) and its row count, on the executors.

    Each Arrow batch is normalised and summed in the Python worker; the partial sums are then
    added up by one Spark aggregate over their positions, so the driver receives ``d + 1`` numbers
    (the count and one sum per dimension), however many members and batches there are.
    """

    def partial(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            x = arrow_matrix(batch.column(0))
            if x.shape[0] == 0:
                continue
            s = np.concatenate([[float(x.shape[0])], normalize_rows(x).astype(np.float64).sum(axis=0)])
            yield pa.RecordBatch.from_arrays([arrow_lists(s[None, :], pa.float64())], names=["s"])

    partials = df.select(EMBEDDING).mapInArrow(partial, "s array<double>")
    rows = partials.select(F.posexplode("s").alias("i", "v")).groupBy("i").agg(F.sum("v").alias("v")).collect()
    if not rows:
        return np.zeros(0, np.float64), 0
    values = np.zeros(len(rows), np.float64)
    for r in rows:  # d + 1 rows: the count at position 0, then the sums
        values[r["i"]] = r["v"]
    return values[1:], int(round(values[0]))


def ers_raw_column(embedding: str, uic: np.ndarray) -> F.Column:
    """``1 - <f_UI, f>`` as a Spark expression: the UIC travels inside the plan (a broadcast constant)."""
    uic_col = F.array(*[F.lit(float(x)) for x in uic])
    dot = F.aggregate(F.zip_with(F.col(embedding), uic_col, lambda a, b: a * b), F.lit(0.0), lambda acc, x: acc + x)
    return (F.lit(1.0) - dot).cast(DoubleType())


def enhanced_udf(uic: np.ndarray):
    """Vectorised ERS-enhanced features (paper eq. 6) for Arrow batches of embeddings."""

    def enhance(embeddings: pd.Series) -> pd.Series:
        emb = np.stack(embeddings.to_numpy()).astype(np.float32)
        # a row parallel to the UIC has no direction left: null (it scores ERS ~0, unrecognizable)
        out = ers_math.enhance_embeddings(emb, uic, parallel="nan")
        return pd.Series([None if np.isnan(row[0]) else row for row in out])

    return F.pandas_udf(enhance, ArrayType(FloatType()))  # type: ignore[call-overload]
