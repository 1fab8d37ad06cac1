"""Face alignment on the executors, the distributed side of :mod:`ers_spark.models.align`: photos -> one
aligned chip (PNG bytes) per detected face, a centred resize, or the reason there is none.
"""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql.types import BinaryType, IntegerType, StringType, StructField, StructType

from ers_spark.lake.contracts import BYTES, DETAIL, FACE_INDEX, IMAGE_ID, PARENT_IMAGE_ID

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
    from ers_spark.models.preprocess import UNDECODABLE_ERRORS, undecodable_detail

    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = np.asarray(img.convert("RGB"))
    except UNDECODABLE_ERRORS as exc:  # bad bytes: this photo only (a missing codec fails the job)
        return [(None, None, f"undecodable photo: {undecodable_detail(exc)}")]
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
