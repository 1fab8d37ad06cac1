"""Decoding images on the executors: Pillow's verdict on each input's bytes (size, format, or the reason it
is bad), a pandas UDF over Arrow batches, so the driver never holds an image.
"""

from __future__ import annotations

import io

import pandas as pd
from pyspark.sql.types import IntegerType, StringType, StructField, StructType

from ers_spark.lake.contracts import DETAIL, FORMAT, HEIGHT, REASON, REASON_EMPTY, REASON_UNDECODABLE, WIDTH

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
    from PIL import Image

    from ers_spark.models.preprocess import UNDECODABLE_ERRORS, undecodable_detail

    if data is None or len(data) == 0:
        return None, None, None, REASON_EMPTY, "file has 0 bytes"
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "unknown").lower()
            img.load()
            width, height = img.size
    except UNDECODABLE_ERRORS as exc:  # a missing codec or MemoryError fails the task instead
        return None, None, None, REASON_UNDECODABLE, undecodable_detail(exc)
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
