"""Spherical k-means, one implementation (faiss) for every use.

locate-ui trains its coarse quantiser and the sub-cells of an oversized cell with it
(:mod:`ers_spark.core.cells`); the clean stage fits an identity's sub-centres with it
(:mod:`ers_spark.core.subcentres`). faiss is imported where it is used
(:func:`faiss_module`) so that ``import ers_spark`` stays light.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import numpy.typing as npt

__all__ = ["faiss_module", "spherical_kmeans"]


def faiss_module() -> Any:
    """faiss (faiss-cpu), imported where it is used so that ``import ers_spark`` stays light."""
    import faiss  # type: ignore[import-untyped,unused-ignore]

    return faiss



@contextlib.contextmanager
def _omp_threads(threads: int | None) -> Iterator[None]:
    """faiss's OpenMP thread count set to ``threads`` inside the block (unchanged when None), restored after."""
    if threads is None:
        yield
        return
    faiss = faiss_module()
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def spherical_kmeans(x: npt.ArrayLike, k: int, seed: int, niter: int = 10, *,
                     threads: int | None = None) -> npt.NDArray[np.float32]:
    """Unit centres of a spherical k-means (faiss) of the unit rows ``x``; k is capped at the row count.

    Deterministic for a seed (faiss draws the initial centres from it). ``threads=1`` trains on one
    OpenMP thread (the setting is restored after): for a few dozen rows, as an identity's images,
    starting a thread per core costs far more than the k-means. No row minimum per centre is
    asked (faiss would warn on stderr below 39 rows per centre).
    """
    sample = np.ascontiguousarray(x, dtype=np.float32)
    k = max(1, min(int(k), sample.shape[0]))
    km = faiss_module().Kmeans(sample.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                               max_points_per_centroid=max(256, sample.shape[0] // k + 1), min_points_per_centroid=1)
    with _omp_threads(threads):
        km.train(sample)
    centres: npt.NDArray[np.float32] = np.asarray(km.centroids, dtype=np.float32)
    return centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
