"""Embedding Recognizability Score (ERS) math: small, pure numpy functions.

A face embedding model maps unrecognizable images (blur, low resolution,
darkness, occlusion, non-faces) into one cluster, the *unrecognizable
identity* (UI). With ``f_UI`` the unit mean of the UI members (the UI centroid,
UIC), the score of an image with unit embedding ``f_i`` is::

    ERS_i = min(1, 1 - <f_UI, f_i>)

so an image close to the UIC has ERS near 0 (unrecognizable) and an image far
from it has ERS near 1. Images with ``ERS < gamma`` are rejected as
unrecognizable; ``gamma`` depends on the model and is calibrated with
the functions of :mod:`ers_spark.core.calibration`.

Conventions used everywhere in this package:

* embeddings are rows of a 2-D array; functions L2-normalise what they need,
  so raw model outputs can be passed directly;
* distances are **cosine distances** ``d = 1 - cos`` (scipy's ``'cosine'``
  metric), never Euclidean distances between unit vectors; a clustering
  threshold ``eps`` is a cosine distance;
* results are float32 for embeddings and float64 for scores and statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "normalize_rows",
    "as_2d_float",
    "unit_vector",
    "ui_centroid",
    "ui_centroid_from_sum",
    "ers_raw",
    "ers_scores",
    "ers_pooling_weights",
    "pool_set",
    "enhance_embeddings",
]

FloatArray = npt.NDArray[np.floating[Any]]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def as_2d_float(x: npt.ArrayLike, name: str) -> FloatArray:
    """``x`` as a real 2-D array (float64 stays float64, anything else becomes float32), or the error naming it."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (n, d), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float64 if arr.dtype == np.float64 else np.float32, copy=False)


def unit_vector(v: npt.ArrayLike, name: str) -> F64:
    """``v`` as a float64 unit vector, or the error naming it (zero or non-finite norm, not 1-D)."""
    vec = np.asarray(v, dtype=np.float64)
    if vec.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector, got shape {vec.shape}")
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"{name} has zero or non-finite norm")
    return vec / norm


def normalize_rows(x: npt.ArrayLike) -> F32:
    """L2-normalise each row to unit length (float32).

    Every ERS formula assumes unit embeddings; a zero (or non-finite) row has
    no direction, so it is an error rather than a silent NaN.

    Parameters
    ----------
    x : array_like, shape (n, d)

    Returns
    -------
    ndarray of float32, shape (n, d)

    Raises
    ------
    ValueError
        ``"normalize_rows: K of N rows have zero or non-finite norm"``.

    Examples
    --------
    >>> normalize_rows([[3.0, 4.0]]).tolist()
    [[0.6000000238418579, 0.800000011920929]]
    """
    arr = as_2d_float(x, "normalize_rows input").astype(np.float64)
    norms = np.linalg.norm(arr, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0.0)
    if bad.any():
        raise ValueError(
            f"normalize_rows: {int(bad.sum())} of {arr.shape[0]} rows have zero or non-finite norm"
        )
    out: F32 = (arr / norms[:, None]).astype(np.float32)
    return out


def ui_centroid(members: npt.ArrayLike) -> F32:
    """Unit mean of the (normalised) UI member embeddings: the UIC ``f_UI``.

    Examples
    --------
    >>> ui_centroid([[1.0, 0.0], [0.0, 2.0]]).astype(float).round(4).tolist()
    [0.7071, 0.7071]
    """
    arr = normalize_rows(members)
    if arr.shape[0] == 0:
        raise ValueError("ui_centroid: members is empty")
    return ui_centroid_from_sum(arr.astype(np.float64).sum(axis=0))


def ui_centroid_from_sum(sum_vec: npt.ArrayLike) -> F32:
    """Normalise a sum of unit member embeddings into the UIC.

    The distributed version sums unit embeddings on executors; the mean and
    the sum have the same direction, so normalising the sum is enough.

    Examples
    --------
    >>> ui_centroid_from_sum([0.0, 3.0]).tolist()
    [0.0, 1.0]
    """
    vec = np.asarray(sum_vec, dtype=np.float64)
    if vec.ndim != 1:
        raise ValueError(f"ui_centroid_from_sum: sum_vec must be 1-D, got shape {vec.shape}")
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("ui_centroid_from_sum: sum of member embeddings has zero or non-finite norm")
    return (vec / norm).astype(np.float32)


def _check_dims(emb: npt.NDArray[Any], uic: npt.NDArray[Any], fn: str) -> None:
    if emb.shape[1] != uic.shape[0]:
        raise ValueError(f"{fn}: embeddings have dimension {emb.shape[1]} but uic has {uic.shape[0]}")


def ers_raw(embeddings: npt.ArrayLike, uic: npt.ArrayLike) -> F64:
    """Uncapped score ``1 - <f_UI, f_i>`` in ``[0, 2]`` (rows and ``uic`` normalised).

    Examples
    --------
    >>> ers_raw([[1.0, 0.0], [-1.0, 0.0]], [2.0, 0.0]).tolist()
    [0.0, 2.0]
    """
    emb = normalize_rows(embeddings).astype(np.float64)
    u = unit_vector(uic, "uic")
    _check_dims(emb, u, "ers_raw")
    return 1.0 - emb @ u


def ers_scores(embeddings: npt.ArrayLike, uic: npt.ArrayLike, cap: bool = True) -> F64:
    """ERS of each row: ``min(1, 1 - <f_UI, f_i>)`` (uncapped if ``cap=False``).

    The cap makes every embedding at least orthogonal to the UIC equally
    recognizable; pooling weights (ERS^2) then stay in ``[0, 1]``.

    Examples
    --------
    >>> ers_scores([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], [1.0, 0.0]).tolist()
    [0.0, 1.0, 1.0]
    """
    raw = ers_raw(embeddings, uic)
    return np.minimum(raw, 1.0) if cap else raw


def ers_pooling_weights(ers: npt.ArrayLike) -> F64:
    """Set-pooling weights ``ERS_i^2 / sum_j ERS_j^2``.

    Squaring suppresses unrecognizable members of a set much more than
    recognizable ones (paper, Sec. set-based recognition).

    Examples
    --------
    >>> ers_pooling_weights([1.0, 1.0, 0.0]).tolist()
    [0.5, 0.5, 0.0]
    """
    e = np.asarray(ers, dtype=np.float64)
    if e.ndim != 1:
        raise ValueError(f"ers_pooling_weights: ers must be 1-D, got shape {e.shape}")
    if e.size == 0:
        raise ValueError("ers_pooling_weights: ers is empty")
    if not np.all(np.isfinite(e)) or np.any(e < 0):
        raise ValueError("ers_pooling_weights: ers must be finite and non-negative")
    w = e * e
    total = float(w.sum())
    if total == 0.0:
        raise ValueError("ers_pooling_weights: all ERS values are zero")
    return w / total


def pool_set(embeddings: npt.ArrayLike, ers: npt.ArrayLike) -> F32:
    """Unit ERS^2-weighted mean of a set of embeddings of one person.

    Examples
    --------
    >>> pool_set([[1.0, 0.0], [0.0, 1.0]], [1.0, 0.0]).tolist()
    [1.0, 0.0]
    """
    emb = normalize_rows(embeddings).astype(np.float64)
    w = ers_pooling_weights(ers)
    if w.shape[0] != emb.shape[0]:
        raise ValueError(f"pool_set: {emb.shape[0]} embeddings but {w.shape[0]} ERS values")
    return ui_centroid_from_sum(w @ emb)


def enhance_embeddings(embeddings: npt.ArrayLike, uic: npt.ArrayLike, *, parallel: str = "raise") -> F32:
    """ERS-enhanced features: remove the UIC component, ``f - <f,u> u``, renormalised.

    Removing the direction shared by all unrecognizable images makes their
    similarity to every gallery identity less spurious.

    Parameters
    ----------
    parallel : {"raise", "nan"}
        What a row (numerically) parallel to the UIC gets, which has no direction left
        once the UIC component is removed: a ValueError, or a row of NaN (the score stage
        stores it as null; such a row has ERS ~0 and is unrecognizable anyway).

    Examples
    --------
    >>> enhance_embeddings([[1.0, 1.0]], [1.0, 0.0]).tolist()
    [[0.0, 1.0]]
    >>> enhance_embeddings([[2.0, 0.0], [1.0, 1.0]], [1.0, 0.0], parallel="nan").tolist()
    [[nan, nan], [0.0, 1.0]]
    """
    if parallel not in ("raise", "nan"):
        raise ValueError(f"enhance_embeddings: parallel must be 'raise' or 'nan', got {parallel!r}")
    emb = normalize_rows(embeddings).astype(np.float64)
    u = unit_vector(uic, "uic")
    _check_dims(emb, u, "enhance_embeddings")
    proj = emb - np.outer(emb @ u, u)
    norms = np.linalg.norm(proj, axis=1)
    bad = norms < 1e-6
    if bad.any() and parallel == "raise":
        raise ValueError(
            f"enhance_embeddings: {int(bad.sum())} of {emb.shape[0]} rows are parallel to the uic"
        )
    safe = np.where(bad, 1.0, norms)
    out: F32 = (proj / safe[:, None]).astype(np.float32)
    out[bad] = np.nan
    return out

