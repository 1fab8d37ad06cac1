"""Turn encoded face crops into the float tensor a model spec asks for.

Decoding is the only per-image step (Pillow has no batch decoder); everything after it, the
channel order, the normalisation and the layout, is done once on the stacked batch.
Bytes that do not decode never raise: they are reported with ``ok=False`` and a one-line reason
so a Spark job can keep the row and say why it has no embedding. Only Pillow's verdicts on the
bytes count as that (:data:`UNDECODABLE_ERRORS`); a missing codec or a ``MemoryError`` is the job's
fault, not the row's, and fails the task.

Example
-------
>>> import io
>>> import numpy as np
>>> from PIL import Image
>>> from ers_spark.models.spec import load_model_spec
>>> from ers_spark.models.preprocess import decode_batch
>>> buf = io.BytesIO()
>>> Image.new("L", (92, 112), 128).save(buf, format="PNG")
>>> batch, ok, reasons = decode_batch([buf.getvalue(), b"not an image", None], load_model_spec("dlib_resnet_v1"))
>>> batch.shape, ok.tolist(), reasons[1].startswith("undecodable image:"), reasons[2]
((1, 3, 150, 150), [True, False, False], True, 'missing image (null bytes)')
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from typing import Sequence

import numpy as np
from PIL import Image

from ers_spark.errors import CodecError
from ers_spark.models.spec import ModelSpec

_RESAMPLE = Image.Resampling.BILINEAR
# what Pillow raises for bytes it cannot make an image of (UnidentifiedImageError is an OSError; broken
# PNG chunks raise SyntaxError; truncated streams OSError or EOFError); nothing else is the row's fault
UNDECODABLE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                      Image.DecompressionBombError)
_MISSING_CODEC = re.compile(r"\b(?:decoder|encoder) (\S+) not available")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def undecodable_detail(exc: BaseException, limit: int = 300) -> str:
    """The one-line reason a row's bytes did not decode; a codec this Pillow lacks fails the job instead.

    Pillow says ``decoder jpeg not available`` when it was built without a codec: every image of
    that format would be quarantined as bad input, so it is a broken runtime (:class:`CodecError`).

    >>> undecodable_detail(OSError("cannot identify image file <_io.BytesIO object>"))
    'cannot identify image file <_io.BytesIO object>'
    >>> undecodable_detail(OSError("decoder jpeg not available"))
    Traceback (most recent call last):
    ...
    ers_spark.errors.CodecError: Pillow on this worker has no jpeg decoder (decoder jpeg not available): install a Pillow built with it on every executor
    """
    missing = _MISSING_CODEC.search(str(exc)) if isinstance(exc, OSError) else None
    if missing:
        raise CodecError(f"Pillow on this worker has no {missing.group(1)} decoder ({_first_line(exc)}): "
                         "install a Pillow built with it on every executor") from exc
    return _first_line(exc)[:limit]


def _decode_one(
    data: bytes | bytearray | memoryview | None, size: tuple[int, int]
) -> tuple[np.ndarray | None, str | None]:
    """Decode one image to a uint8 array of ``size`` (width, height), or give a reason.

    Grey images stay one channel (H, W): resizing one channel instead of three and
    broadcasting later gives the same pixels for a third of the work. Large JPEGs are
    downscaled in the DCT domain first (``Image.draft``, as ``thumbnail`` does); the draft
    never goes below the target size, so a bilinear resize still makes the final pixels.
    """
    if data is None:
        return None, "missing image (null bytes)"
    if len(data) == 0:
        return None, "empty image (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG" and (im.width >= 2 * size[0] and im.height >= 2 * size[1]):
                im.draft(None, size)
            im.load()  # forces the full decode: truncated files raise here
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            if im.size != size:
                im = im.resize(size, _RESAMPLE)
            return np.asarray(im, dtype=np.uint8), None
    except UNDECODABLE_ERRORS as exc:
        return None, f"undecodable image: {undecodable_detail(exc)}"


def decode_images(
    images: Sequence[bytes | None], spec: ModelSpec
) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Decode encoded images to uint8 arrays at the spec's size (None and a reason for bad ones).

    The float conversion is left to :func:`prepare_arrays`, so a caller can run it per
    inference sub-batch and keep the working set small.
    """
    size = (spec.input_width, spec.input_height)
    pairs = [_decode_one(data, size) for data in images]
    return [arr for arr, _ in pairs], [reason for _, reason in pairs]


def prepare_arrays(images: Sequence[np.ndarray], spec: ModelSpec) -> np.ndarray:
    """Stack HxWx3 uint8 RGB arrays into a normalised float32 batch in the spec's layout.

    Arrays whose size differs from the spec are resized (bilinear); grey HxW arrays are
    repeated to three channels.

    Parameters
    ----------
    images : sequence of numpy.ndarray
        RGB images, uint8, shape (H, W, 3) (or (H, W) grey).
    spec : ModelSpec
        Gives the size, channel order, mean/std and layout.

    Returns
    -------
    numpy.ndarray
        float32, ``[N, 3, H, W]`` for NCHW or ``[N, H, W, 3]`` for NHWC.

    Example
    -------
    >>> import numpy as np
    >>> from ers_spark.models.spec import load_model_spec
    >>> x = prepare_arrays([np.zeros((150, 150, 3), np.uint8)], load_model_spec("dlib_resnet_v1"))
    >>> x.shape, round(float(x[0, 0, 0, 0]), 4)
    ((1, 3, 150, 150), -0.4796)
    """
    h, w = spec.input_height, spec.input_width
    n = len(images)
    stacked = np.empty((n, h, w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.shape[:2] != (h, w):
            pil = Image.fromarray(arr if arr.ndim == 2 else arr[:, :, :3])
            arr = np.asarray(pil.resize((w, h), _RESAMPLE))
        stacked[i] = arr[:, :, None] if arr.ndim == 2 else arr[:, :, :3]  # grey broadcasts to 3 channels
    if spec.channel_order == "BGR":
        stacked = stacked[..., ::-1]
    if spec.layout == "NCHW":
        stacked = stacked.transpose(0, 3, 1, 2)  # a view: the copy happens once, in the float pass
    mean = np.asarray(spec.mean, dtype=np.float32)
    inv_std = (1.0 / np.asarray(spec.std, dtype=np.float64)).astype(np.float32)
    if spec.layout == "NCHW":
        mean, inv_std = mean[:, None, None], inv_std[:, None, None]
    batch = np.empty(stacked.shape, dtype=np.float32)
    np.subtract(stacked, mean, out=batch)  # two in-place passes, no float temporaries
    np.multiply(batch, inv_std, out=batch)
    return batch


def decode_batch(
    images: Sequence[bytes | None], spec: ModelSpec
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Decode encoded images (JPEG/PNG/PGM/...) into one model-ready batch.

    Parameters
    ----------
    images : sequence of bytes or None
        Encoded images; None or empty marks a missing image.
    spec : ModelSpec
        Target size, channel order, normalisation and layout.

    Returns
    -------
    batch : numpy.ndarray
        float32 batch holding only the decodable images, in input order
        (``batch.shape[0] == ok.sum()``), so no inference is spent on bad rows.
    ok : numpy.ndarray of bool
        One flag per input image.
    reasons : list of str or None
        None for good images, else a one-line reason such as ``"undecodable image: ..."``.
    """
    decoded, reasons = decode_images(images, spec)
    ok = np.array([arr is not None for arr in decoded], dtype=bool)
    return prepare_arrays([arr for arr in decoded if arr is not None], spec), ok, reasons
