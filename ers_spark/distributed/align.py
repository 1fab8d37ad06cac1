"""Face alignment inside the embed pass, the executors' side of :mod:`ers_spark.models.align`.

Each crop of a batch is decoded at its own size, its largest face is found and cut the way the
model's spec says (:class:`~ers_spark.models.spec.FaceAlignment`), and the chip goes straight to
the model: no chip is encoded, shuffled or written to a table. A crop where no face is found is
embedded as a centred resize (``embed.no_face: embed_unaligned``, ``aligned = false``) or gets the
reason :data:`NO_FACE_DETAIL` (``quarantine``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ers_spark.models.spec import FaceAlignment

NO_FACE_DETAIL = "no face detected"

# JPEGs larger than this many chip sides are decoded at a reduced scale (in the DCT domain) before detection
_DRAFT_SIDES = 8


@dataclass
class AlignedBatch:
    """One batch of crops as chips: per row the chip (None and a reason where there is none), whether a
    face was found (the ``aligned`` column), and how many faces the detector saw."""

    chips: list[np.ndarray | None]
    reasons: list[str | None]
    aligned: np.ndarray
    faces: np.ndarray


def decode_photo(data: bytes | None, size: int) -> tuple[np.ndarray | None, str | None]:
    """A crop decoded to uint8 RGB at (about) its own size, or the reason it does not decode."""
    from PIL import Image

    from ers_spark.models.preprocess import UNDECODABLE_ERRORS, undecodable_detail

    if data is None:
        return None, "missing image (null bytes)"
    if len(data) == 0:
        return None, "empty image (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG" and min(im.size) >= _DRAFT_SIDES * size:
                im.draft("RGB", (_DRAFT_SIDES // 2 * size, _DRAFT_SIDES // 2 * size))
            im.load()  # truncated files raise here
            return np.asarray(im.convert("RGB"), dtype=np.uint8), None
    except UNDECODABLE_ERRORS as exc:  # the bytes' fault: this row only (a missing codec fails the job)
        return None, f"undecodable image: {undecodable_detail(exc)}"


def align_images(images: Sequence[bytes | None], alignment: FaceAlignment, size: int, min_side: int,
                 embed_unaligned: bool) -> AlignedBatch:
    """Decode and align one batch of crops (a missing dlib raises ModelError: a broken job, not bad rows)."""
    from ers_spark.models.align import aligned_chip, centred_resize

    n = len(images)
    batch = AlignedBatch([None] * n, [None] * n, np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int32))
    for row, data in enumerate(images):
        rgb, reason = decode_photo(data, size)
        if rgb is None:
            batch.reasons[row] = reason
            continue
        chip, batch.faces[row] = aligned_chip(rgb, alignment, size, min_side)
        if chip is not None:
            batch.chips[row], batch.aligned[row] = chip, True
        elif embed_unaligned:
            batch.chips[row] = centred_resize(rgb, size)
        else:
            batch.reasons[row] = NO_FACE_DETAIL
    return batch
