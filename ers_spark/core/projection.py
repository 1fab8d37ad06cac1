"""2-D projection of embeddings for the report's map: PCA fitted on a sample, pure numpy.

The report draws a capped sample of embeddings; a linear projection keeps the
picture honest (distances along the axes are distances in the embedding space,
shrunk), and the UI centroid can be projected with the same fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["PcaFit", "fit_pca", "project"]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class PcaFit:
    """Mean, principal axes (rows, unit length) and the share of variance each axis explains."""

    mean: F64
    components: F64
    explained_ratio: F64


def fit_pca(x: npt.NDArray[np.floating[Any]], n_components: int = 2) -> PcaFit:
    """Principal axes of the rows of ``x`` by SVD of the centred data.

    Signs are fixed so that each axis's largest-magnitude loading is positive,
    so the same data always gives the same picture.
    """
    data = np.asarray(x, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] < 2:
        raise ValueError(f"fit_pca needs a 2-D array of at least 2 rows, got shape {data.shape}")
    if not 1 <= n_components <= data.shape[1]:
        raise ValueError(f"n_components must be in [1, {data.shape[1]}], got {n_components}")
    mean = data.mean(axis=0)
    _, singular, vt = np.linalg.svd(data - mean, full_matrices=False)
    components = vt[:n_components].copy()
    pivots = np.abs(components).argmax(axis=1)
    components *= np.sign(components[np.arange(n_components), pivots])[:, None]
    variance = singular**2
    total = variance.sum()
    ratio = variance[:n_components] / total if total > 0 else np.zeros(n_components)
    return PcaFit(mean=mean, components=components, explained_ratio=ratio)


def project(fit: PcaFit, x: npt.NDArray[np.floating[Any]]) -> F64:
    """Coordinates of the rows of ``x`` on the fitted axes."""
    data = np.atleast_2d(np.asarray(x, dtype=np.float64))
    return (data - fit.mean) @ fit.components.T
