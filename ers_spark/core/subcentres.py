"""Label noise within an identity, sub-center ArcFace style: sub-centres, angles, thresholds.

An identity's images are split into ``k`` sub-centres (spherical k-means); the largest is its
clean mode. An image far from the clean group of its own identity, and closer to another
identity's centre, is label noise. Angles are in degrees between unit vectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ers_spark.core.clustering import spherical_kmeans
from ers_spark.core.ers import as_2d_float, normalize_rows, unit_vector

__all__ = [
    "subcentre_count",
    "dominant_subcentre",
    "row_angles",
    "subcenter_label_noise",
    "impostor_angles",
    "nearest_other_centre",
    "best_other_cosine",
    "impostor_angle_threshold",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


def subcentre_count(n_images: int, k: int, min_images_per_subcentre: int) -> int:
    """Sub-centres worth fitting to an identity of ``n_images``: ``k``, fewer when each would hold too few images.

    k-means always splits its input; on a small identity it splits *clean* faces into
    sub-clusters, and measuring them against one of those sub-clusters flags correct labels.
    So each sub-centre must be backed by ``min_images_per_subcentre`` images (at least 1 sub-centre).

    >>> subcentre_count(10, 3, 10), subcentre_count(35, 3, 10), subcentre_count(4, 3, 10)
    (1, 3, 1)
    """
    if k < 1 or min_images_per_subcentre < 1:
        raise ValueError(f"subcentre_count: k and min_images_per_subcentre must be >= 1, got {k}, {min_images_per_subcentre}")
    return max(1, min(k, n_images // min_images_per_subcentre))


def dominant_subcentre(embeddings: npt.ArrayLike, k: int, seed: int = 0, n_iter: int = 20) -> tuple[F32, F64, IntArray]:
    """The dominant (largest) of ``k`` spherical k-means sub-centres of one identity
    (:func:`~ers_spark.core.clustering.spherical_kmeans`, on one thread).

    This approximates sub-center ArcFace, where each identity has ``k`` *learned* sub-centres
    and the one holding most of the identity's images is its clean mode; here they are
    fitted to the embeddings after the fact. ``k`` is clipped to the number of images.

    Returns
    -------
    dominant : float32 unit vector (d,)
    centres : float64 (k, d) unit sub-centres
    assign : int64 (n,) sub-centre of each image (the dominant one is ``argmax(bincount(assign))``, ties: lowest)
    """
    if k < 1:
        raise ValueError(f"dominant_subcentre: k must be >= 1, got {k}")
    x = normalize_rows(embeddings).astype(np.float64)
    if x.shape[0] == 0:
        raise ValueError("dominant_subcentre: embeddings is empty")
    k = min(k, x.shape[0])
    if k == 1:
        centres = unit_vector(x.sum(axis=0), "mean of identity embeddings")[None, :]
        assign = np.zeros(x.shape[0], dtype=np.int64)
    else:
        centres = spherical_kmeans(x, k, seed, niter=n_iter, threads=1).astype(np.float64)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        assign = np.argmax(x @ centres.T, axis=1).astype(np.int64)
    dominant = centres[int(np.argmax(np.bincount(assign, minlength=k)))]
    return dominant.astype(np.float32), centres, assign


def _angle_deg(cos: npt.ArrayLike) -> F64:
    return np.degrees(np.arccos(np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0)))


def row_angles(embeddings: npt.ArrayLike, centres: npt.ArrayLike) -> F64:
    """Angle in degrees between each row (normalised here) and the unit centre on the same row.

    >>> row_angles([[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]).round(1).tolist()
    [0.0, 90.0]
    """
    x = normalize_rows(as_2d_float(embeddings, "embeddings")).astype(np.float64)
    c = as_2d_float(centres, "centres").astype(np.float64)
    if c.shape != x.shape:
        raise ValueError(f"row_angles: centres shape {c.shape} does not match embeddings shape {x.shape}")
    return _angle_deg(np.einsum("ij,ij->i", x, c))


def subcenter_label_noise(
    embeddings: npt.ArrayLike,
    k: int = 3,
    max_angle_deg: float = 75.0,
    seed: int = 0,
    n_iter: int = 20,
) -> tuple[BoolArray, F64, F32]:
    """Flag label noise within one identity, sub-center ArcFace style (sub-centres by spherical k-means).

    1. Fit ``k`` sub-centres (:func:`dominant_subcentre`); the largest is the dominant one.
    2. The identity's *clean group* is the dominant sub-centre's images plus those of every
       other sub-centre lying within ``max_angle_deg`` of it (another pose of the same person
       is not noise; k-means splits clean faces too).
    3. Each image's angle is measured to the unit mean of the clean group **without that
       image** (leave-one-out), so a mislabelled image cannot pull its own reference towards
       itself and its angle is an impostor angle like any other person's image.
    4. Images whose angle exceeds ``max_angle_deg`` are dropped (``keep`` False).

    Returns
    -------
    keep_mask : bool ndarray (n,)
    angles_deg : float64 ndarray (n,)
    centre : float32 unit vector (d,), the unit mean of the clean group (all of it)

    Examples
    --------
    >>> x = [[1, 0], [0.99, 0.1], [0.98, -0.1], [1, 0.05], [-1, 0]]
    >>> keep, ang, c = subcenter_label_noise(x, k=2, max_angle_deg=75)
    >>> keep.tolist()
    [True, True, True, True, False]
    """
    if k < 1:
        raise ValueError(f"subcenter_label_noise: k must be >= 1, got {k}")
    x = normalize_rows(embeddings).astype(np.float64)
    if x.shape[0] == 0:
        raise ValueError("subcenter_label_noise: embeddings is empty")
    dominant, centres, assign = dominant_subcentre(x, k, seed=seed, n_iter=n_iter)
    near = _angle_deg(centres @ dominant.astype(np.float64)) <= max_angle_deg
    near[int(np.argmax(np.bincount(assign, minlength=centres.shape[0])))] = True
    in_group = near[assign]
    total = x[in_group].sum(axis=0)
    reference = np.where(in_group[:, None], total[None, :] - x, total[None, :])
    norms = np.linalg.norm(reference, axis=1)
    alone = norms <= 1e-12  # the group's only image: its reference is itself
    reference[alone] = x[alone]
    norms[alone] = 1.0
    angles = _angle_deg(np.einsum("ij,ij->i", x, reference) / norms)
    centre = unit_vector(total, "sum of the clean group")
    return angles <= max_angle_deg, angles, centre.astype(np.float32)


def impostor_angles(
    embeddings: npt.ArrayLike, identity: npt.ArrayLike, centres: npt.ArrayLike, centre_identity: npt.ArrayLike
) -> F64:
    """Angles (degrees) between each image and every centre of *another* identity, flattened.

    These are the angles a mislabelled image has to the centre of the identity it was wrongly
    given, so a low percentile ``q`` of them is a threshold that catches about ``1 - q/100``
    of swapped labels (see :func:`impostor_angle_threshold`).

    >>> impostor_angles([[1, 0], [0, 1]], ["a", "b"], [[1, 0], [0, 1]], ["a", "b"]).tolist()
    [90.0, 90.0]
    """
    emb = normalize_rows(embeddings).astype(np.float64)
    cent = normalize_rows(centres).astype(np.float64)
    other = np.asarray(identity)[:, None] != np.asarray(centre_identity)[None, :]
    return _angle_deg((emb @ cent.T)[other])


def nearest_other_centre(
    embeddings: npt.ArrayLike, identity: npt.ArrayLike, centres: npt.ArrayLike, centre_identity: npt.ArrayLike
) -> tuple[F64, npt.NDArray[Any]]:
    """Per image: the angle (degrees) to the nearest centre of *another* identity, and that identity.

    Why: an image far from its own identity is label noise only when it looks like someone
    else; a degraded image of the right person is far from every centre. Images with no other
    identity among ``centre_identity`` get ``inf`` and ``None``.

    >>> ang, who = nearest_other_centre([[1, 0], [0, 1]], ["a", "a"], [[1, 0], [0.6, 0.8]], ["a", "b"])
    >>> ang.round(1).tolist(), who.tolist()
    ([53.1, 36.9], ['b', 'b'])
    """
    best_cos, who = best_other_cosine(embeddings, identity, centres, centre_identity)
    found = np.isfinite(best_cos)
    return np.where(found, _angle_deg(np.where(found, best_cos, 1.0)), np.inf), who


def best_other_cosine(
    embeddings: npt.ArrayLike, identity: npt.ArrayLike, entries: npt.ArrayLike, entry_identity: npt.ArrayLike
) -> tuple[F64, npt.NDArray[Any]]:
    """Per row: the largest cosine to an entry of *another* identity (``-inf`` and None when there is none).

    The label-noise claim (entries: identities' centres) and 1:N search (entries: the gallery) both ask it.

    >>> cos, who = best_other_cosine([[1, 0]], ["a"], [[1, 0], [0.6, 0.8], [0, 1]], ["a", "b", "c"])
    >>> cos.round(2).tolist(), who.tolist()
    ([0.6], ['b'])
    """
    emb = normalize_rows(embeddings).astype(np.float64)
    ent = normalize_rows(entries).astype(np.float64) if len(entry_identity) else np.zeros((0, emb.shape[1]))
    cos = emb @ ent.T
    own = np.asarray(identity, dtype=object)[:, None] == np.asarray(entry_identity, dtype=object)[None, :]
    cos[own] = -np.inf
    if cos.shape[1] == 0:
        return np.full(emb.shape[0], -np.inf), np.full(emb.shape[0], None, dtype=object)
    best = np.argmax(cos, axis=1)
    best_cos = cos[np.arange(emb.shape[0]), best]
    who = np.where(np.isfinite(best_cos), np.asarray(entry_identity, dtype=object)[best], None)
    return best_cos, who


def impostor_angle_threshold(angles: npt.ArrayLike, percentile: float) -> float:
    """The ``percentile``-th percentile of impostor angles: the label-noise angle threshold.

    A sample is flagged when it is farther from its own identity's clean centre than the
    closest ``percentile`` % of other people's images are from that identity's centre, i.e.
    when it looks no more like its own identity than a typical impostor does. A swapped
    label is an impostor image, so about ``1 - percentile/100`` of them are caught; a correctly
    labelled image is flagged only when it sits that far out, which a model that separates
    identities rarely does.

    >>> impostor_angle_threshold([10.0, 20.0, 30.0, 40.0, 50.0], 25.0)
    20.0
    """
    a = np.asarray(angles, dtype=np.float64)
    if a.size == 0:
        raise ValueError("impostor_angle_threshold needs impostor angles (at least two identities)")
    if not 0.0 < percentile < 100.0:
        raise ValueError(f"impostor_angle_threshold: percentile must be in (0, 100), got {percentile}")
    return float(np.percentile(a, percentile))
