"""Embedding Recognizability Score (ERS) math: small, pure numpy functions.

A face embedding model maps unrecognizable images (blur, low resolution,
darkness, occlusion, non-faces) into one cluster, the *unrecognizable
identity* (UI). With ``f_UI`` the unit mean of the UI members (the UI centroid,
UIC), the score of an image with unit embedding ``f_i`` is::

    ERS_i = min(1, 1 - <f_UI, f_i>)

so an image close to the UIC has ERS near 0 (unrecognizable) and an image far
from it has ERS near 1. Images with ``ERS < gamma`` are rejected as
unrecognizable; ``gamma`` depends on the model and is calibrated with
:func:`calibrate_gamma_pairs`, :func:`calibrate_gamma_identities` or
:func:`calibrate_gamma_unlabelled`.

Conventions used everywhere in this package:

* embeddings are rows of a 2-D array; functions L2-normalise what they need,
  so raw model outputs can be passed directly;
* distances are **cosine distances** ``d = 1 - cos`` (scipy's ``'cosine'``
  metric), never Euclidean distances between unit vectors; a clustering
  threshold ``eps`` is a cosine distance;
* results are float32 for embeddings and float64 for scores and statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

from ers_spark.errors import ClusteringError, ErsUserError

__all__ = [
    "GammaCalibration",
    "normalize_rows",
    "ui_centroid",
    "ui_centroid_from_sum",
    "ers_raw",
    "ers_scores",
    "ers_pooling_weights",
    "pool_set",
    "enhance_embeddings",
    "roc_auc",
    "threshold_at_far",
    "tar_at_far",
    "calibrate_gamma_pairs",
    "build_identity_pairs",
    "calibrate_gamma_identities",
    "identity_pair_similarities",
    "calibrate_gamma_unlabelled",
    "subcentre_count",
    "dominant_subcentre",
    "subcenter_label_noise",
    "impostor_angles",
    "impostor_angle_threshold",
]

FloatArray = npt.NDArray[np.floating[Any]]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class GammaCalibration:
    """Result of a gamma calibration.

    Attributes
    ----------
    gamma : float
        Images with ``ERS < gamma`` are treated as unrecognizable.
    frr : float
        False reject rate at ``gamma`` (meaning depends on ``method``).
    far : float
        False accept rate at ``gamma`` (meaning depends on ``method``).
    threshold : float
        Similarity (cosine) threshold of the verifier at ``gamma``; NaN for the
        unlabelled method, which has no verifier.
    method : str
        ``"pairs-frr-at-far"`` or ``"unlabelled-youden"``.
    """

    gamma: float
    frr: float
    far: float
    threshold: float
    method: str


# --------------------------------------------------------------------------- basics


def _as_2d_float(x: npt.ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (n, d), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float64 if arr.dtype == np.float64 else np.float32, copy=False)


def _unit_vector(v: npt.ArrayLike, name: str) -> F64:
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
    arr = _as_2d_float(x, "normalize_rows input").astype(np.float64)
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
    u = _unit_vector(uic, "uic")
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
    u = _unit_vector(uic, "uic")
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


# --------------------------------------------------------------------------- verification metrics


def roc_auc(scores: npt.ArrayLike, positives: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg)); ties count 1/2.

    Examples
    --------
    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    0.75
    >>> roc_auc([1.0, 1.0], [True, False])
    0.5
    """
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(positives)
    if s.ndim != 1 or p.shape != s.shape:
        raise ValueError(f"roc_auc: scores {s.shape} and positives {p.shape} must be 1-D of equal length")
    p = p.astype(bool)
    n_pos = int(p.sum())
    n_neg = int(p.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc: need at least one positive and one negative")
    ranks = rankdata(s, method="average")
    u = float(ranks[p].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def threshold_at_far(impostor_scores: npt.ArrayLike, far: float) -> float:
    """Smallest threshold ``t`` (from the impostor scores) with ``mean(imp > t) <= far``.

    Acceptance is ``score > t`` (strict). With ``k = floor(far * n_imp)``
    false accepts allowed, ``t`` is the (k+1)-th largest impostor score, or
    ``-inf`` if every impostor may be accepted.

    Examples
    --------
    >>> threshold_at_far([0.1, 0.2, 0.3, 0.4], 0.25)
    0.3
    """
    imp = np.asarray(impostor_scores, dtype=np.float64)
    if imp.ndim != 1 or imp.size == 0:
        raise ValueError("threshold_at_far: impostor_scores must be a non-empty 1-D array")
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"threshold_at_far: far must be in [0, 1], got {far}")
    k = int(np.floor(far * imp.size + 1e-9))
    if k >= imp.size:
        return float("-inf")
    return float(np.sort(imp)[::-1][k])


def tar_at_far(genuine_scores: npt.ArrayLike, impostor_scores: npt.ArrayLike, far: float) -> float:
    """True accept rate at the threshold given by :func:`threshold_at_far`.

    Examples
    --------
    >>> tar_at_far([0.35, 0.5, 0.2], [0.1, 0.2, 0.3, 0.4], 0.25)
    0.6666666666666666
    """
    gen = np.asarray(genuine_scores, dtype=np.float64)
    if gen.ndim != 1 or gen.size == 0:
        raise ValueError("tar_at_far: genuine_scores must be a non-empty 1-D array")
    t = threshold_at_far(impostor_scores, far)
    return float(np.mean(gen > t))


# --------------------------------------------------------------------------- gamma calibration


def calibrate_gamma_pairs(
    sim: npt.ArrayLike,
    ers_a: npt.ArrayLike,
    ers_b: npt.ArrayLike,
    is_same: npt.ArrayLike,
    target_far: float,
    grid: npt.ArrayLike | None = None,
) -> GammaCalibration:
    """Choose gamma minimising the FRR at a fixed FAR (the paper's TinyFace procedure).

    For each candidate ``gamma`` in ``grid``:

    1. a pair is *unsure* when ``min(ers_a, ers_b) < gamma``; unsure pairs are
       rejected whatever their similarity;
    2. among the sure impostor pairs the similarity threshold ``t`` is the
       smallest impostor similarity with ``#(sure impostors with sim > t) <=
       floor(target_far * N_imp)``, where ``N_imp`` counts **all** impostor
       pairs (an unsure impostor is a correct reject, so rejecting images
       buys room for a lower threshold); ``t = -inf`` when every sure impostor
       fits in the budget;
    3. a pair is accepted iff it is sure and ``sim > t``;
       ``FAR = accepted impostors / N_imp`` (always ``<= target_far``) and
       ``FRR = 1 - accepted genuine / N_gen`` over **all** genuine pairs (an
       unsure genuine pair is a false reject).

    The chosen gamma has the smallest FRR; ties go to the smallest gamma
    (reject as little as possible). The default grid is 0 plus 201 quantiles
    of ``min(ers_a, ers_b)``; ``gamma = 0`` reproduces the plain verifier.

    Examples
    --------
    >>> r = calibrate_gamma_pairs([0.9, 0.8, 0.85, 0.1], [1, 1, 0.05, 1],
    ...                           [1, 1, 1, 1], [True, True, False, False], 0.0)
    >>> round(r.gamma, 2), r.frr, r.far
    (0.06, 0.0, 0.0)
    """
    s, min_ers, same = _checked_pair_arrays(sim, ers_a, ers_b, is_same, target_far)
    cand = _gamma_grid(min_ers, grid)
    pairs = _split_pairs(s, min_ers, same, target_far)
    best: tuple[float, float, float, float] | None = None  # (frr, gamma, far, t)
    for g in cand:
        frr, far, t = _rates_at_gamma(pairs, float(g))
        if best is None or frr < best[0]:
            best = (frr, float(g), far, t)
    assert best is not None
    return GammaCalibration(gamma=best[1], frr=best[0], far=best[2], threshold=best[3], method="pairs-frr-at-far")


def _checked_pair_arrays(
    sim: npt.ArrayLike, ers_a: npt.ArrayLike, ers_b: npt.ArrayLike, is_same: npt.ArrayLike, target_far: float
) -> tuple[F64, F64, BoolArray]:
    """(similarity, min(ers_a, ers_b), is_same as bool), after checking shapes, target_far and both kinds exist.

    Why first: a calibration on mismatched or one-sided input would return a meaningless gamma.
    """
    s = np.asarray(sim, dtype=np.float64)
    ea = np.asarray(ers_a, dtype=np.float64)
    eb = np.asarray(ers_b, dtype=np.float64)
    same = np.asarray(is_same)
    if s.ndim != 1 or not (ea.shape == eb.shape == same.shape == s.shape):
        raise ValueError(
            "calibrate_gamma_pairs: sim, ers_a, ers_b and is_same must be 1-D arrays of equal length"
        )
    same = same.astype(bool)
    if not 0.0 <= target_far <= 1.0:
        raise ValueError(f"calibrate_gamma_pairs: target_far must be in [0, 1], got {target_far}")
    n_gen = int(same.sum())
    n_imp = int(same.size - n_gen)
    if n_gen == 0 or n_imp == 0:
        raise ErsUserError(
            f"gamma calibration needs genuine and impostor pairs, got {n_gen} genuine and {n_imp} impostor"
        )
    return s, np.minimum(ea, eb), same


def _gamma_grid(min_ers: F64, grid: npt.ArrayLike | None) -> F64:
    """Sorted unique candidate gammas: ``grid``, or 0 plus 201 quantiles of ``min_ers``."""
    if grid is None:
        return np.unique(np.concatenate([[0.0], np.quantile(min_ers, np.linspace(0.0, 1.0, 201))]))
    cand = np.unique(np.asarray(grid, dtype=np.float64).ravel())
    if cand.size == 0:
        raise ValueError("calibrate_gamma_pairs: grid is empty")
    return cand


@dataclass(frozen=True)
class _SplitPairs:
    """Genuine and impostor pairs apart, impostors by similarity descending, plus the FAR budget.

    Why: sorted once, so the threshold at any gamma is the (budget+1)-th sure impostor in that order.
    """

    imp_sim_desc: F64
    imp_min_desc: F64
    gen_sim: F64
    gen_min: F64
    budget: int  # impostors that may be accepted: floor(target_far * N_imp)


def _split_pairs(s: F64, min_ers: F64, same: BoolArray, target_far: float) -> _SplitPairs:
    """Split the checked pairs by kind; sort impostors by similarity (descending, stable)."""
    imp_sim = s[~same]
    order = np.argsort(-imp_sim, kind="stable")
    return _SplitPairs(
        imp_sim_desc=imp_sim[order],
        imp_min_desc=min_ers[~same][order],
        gen_sim=s[same],
        gen_min=min_ers[same],
        budget=int(np.floor(target_far * imp_sim.size + 1e-9)),
    )


def _rates_at_gamma(pairs: _SplitPairs, g: float) -> tuple[float, float, float]:
    """(FRR, FAR, similarity threshold t) when pairs with ``min ERS < g`` are rejected."""
    n_imp, n_gen = pairs.imp_sim_desc.size, pairs.gen_sim.size
    sure_imp = pairs.imp_min_desc >= g
    csum = np.cumsum(sure_imp)
    if csum[-1] <= pairs.budget:
        t = float("-inf")
    else:
        pos = int(np.searchsorted(csum, pairs.budget + 1))  # index of the (budget+1)-th sure impostor
        t = float(pairs.imp_sim_desc[pos])
    far = float(np.count_nonzero(sure_imp & (pairs.imp_sim_desc > t))) / n_imp
    acc_gen = np.count_nonzero((pairs.gen_min >= g) & (pairs.gen_sim > t))
    frr = float(1.0 - acc_gen / n_gen)
    return frr, far, t


def _all_within_group_pairs(starts: IntArray, sizes: IntArray) -> tuple[IntArray, IntArray]:
    """All (p, q), p < q, of positions inside the same contiguous group (vectorised)."""
    n = int(sizes.sum())
    group_end = np.repeat(starts + sizes, sizes)  # exclusive end per position
    pos = np.arange(n, dtype=np.int64)
    counts = group_end - pos - 1
    p = np.repeat(pos, counts)
    first = np.cumsum(counts) - counts  # offset of each p's run
    q = p + 1 + (np.arange(p.size, dtype=np.int64) - np.repeat(first, counts))
    return p, q


def build_identity_pairs(
    identities: npt.ArrayLike, max_pairs: int = 200_000, seed: int = 0
) -> tuple[IntArray, IntArray, BoolArray]:
    """Genuine and impostor row-index pairs ``(i, j, is_same)`` from identity labels.

    Up to ``max_pairs // 2`` pairs of each kind. A kind with at most that many
    pairs is enumerated completely (vectorised); otherwise exactly
    ``max_pairs // 2`` pairs are drawn uniformly over all pairs of that kind,
    with replacement (duplicates possible, rare), from ``default_rng(seed)``,
    so the result is deterministic. Always ``i < j``; genuine pairs come first.
    Every label, including a "UI" label such as -1, is treated as an identity:
    pass only rows with real identity labels.
    """
    labels = np.asarray(identities)
    if labels.ndim != 1:
        raise ValueError(f"build_identity_pairs: identities must be 1-D, got shape {labels.shape}")
    if max_pairs < 2:
        raise ValueError(f"build_identity_pairs: max_pairs must be >= 2, got {max_pairs}")
    half = max_pairs // 2
    rng = np.random.default_rng(seed)
    inv, order, starts, sizes = _group_layout(labels)
    # genuine pairs draw from rng before impostor pairs: this order fixes the result for a seed
    gi, gj = _genuine_pairs(rng, order, starts, sizes, half)
    n_gen_total = int((sizes * (sizes - 1) // 2).sum())
    ii, jj = _impostor_pairs(rng, inv, n_gen_total, half)
    i_all = np.concatenate([gi, ii]).astype(np.int64)
    j_all = np.concatenate([gj, jj]).astype(np.int64)
    lo, hi = np.minimum(i_all, j_all), np.maximum(i_all, j_all)
    is_same = np.concatenate([np.ones(gi.size, bool), np.zeros(ii.size, bool)])
    return lo, hi, is_same


def _group_layout(labels: npt.NDArray[Any]) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """(label code per row, rows ordered by label, start and size of each label's run in that order).

    Why: with rows grouped into contiguous runs, a genuine pair is two positions in one run.
    """
    n = labels.size
    _, inv = np.unique(labels, return_inverse=True)
    inv = inv.astype(np.int64).ravel()
    order = np.argsort(inv, kind="stable").astype(np.int64)
    sorted_lab = inv[order]
    starts = np.flatnonzero(np.r_[True, sorted_lab[1:] != sorted_lab[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, n]).astype(np.int64)
    return inv, order, starts, sizes


def _genuine_pairs(
    rng: np.random.Generator, order: IntArray, starts: IntArray, sizes: IntArray, half: int
) -> tuple[IntArray, IntArray]:
    """Row pairs with the same label: all of them when at most ``half``, else ``half`` drawn uniformly."""
    n_gen_total = int((sizes * (sizes - 1) // 2).sum())
    if n_gen_total <= half:
        p, q = _all_within_group_pairs(starts, sizes)
    else:
        # draw a group with probability proportional to its number of pairs, then a pair in it
        w = (sizes * (sizes - 1) / 2).astype(np.float64)
        grp = rng.choice(sizes.size, size=half, p=w / w.sum())
        s = sizes[grp]
        a = (rng.random(half) * s).astype(np.int64)
        b = (rng.random(half) * (s - 1)).astype(np.int64)
        b = b + (b >= a)
        p = starts[grp] + np.minimum(a, b)
        q = starts[grp] + np.maximum(a, b)
    return order[p], order[q]


def _impostor_pairs(rng: np.random.Generator, inv: IntArray, n_gen_total: int, half: int) -> tuple[IntArray, IntArray]:
    """Row pairs ``i < j`` with different labels: all when at most ``half``, else ``half`` drawn uniformly.

    Why rejection sampling: uniform over all impostor pairs without listing them (n^2 for big sets).
    """
    n = inv.size
    if n * (n - 1) // 2 - n_gen_total <= half:
        ii, jj = np.triu_indices(n, k=1)
        keep = inv[ii] != inv[jj]
        return ii[keep].astype(np.int64), jj[keep].astype(np.int64)
    got_i: list[IntArray] = []
    got_j: list[IntArray] = []
    have = 0
    while have < half:
        m = 2 * (half - have) + 16
        a = rng.integers(0, n, size=m)
        b = rng.integers(0, n, size=m)
        ok = inv[a] != inv[b]
        a, b = a[ok], b[ok]
        got_i.append(np.minimum(a, b))
        got_j.append(np.maximum(a, b))
        have += a.size
    return np.concatenate(got_i)[:half].astype(np.int64), np.concatenate(got_j)[:half].astype(np.int64)


def calibrate_gamma_identities(
    embeddings: npt.ArrayLike,
    identities: npt.ArrayLike,
    ers: npt.ArrayLike,
    target_far: float,
    max_pairs: int = 200_000,
    seed: int = 0,
    grid: npt.ArrayLike | None = None,
) -> GammaCalibration:
    """Calibrate gamma on a labelled set: build pairs, then :func:`calibrate_gamma_pairs`.

    Pairs come from :func:`build_identity_pairs` (deterministic for a seed);
    similarity is the cosine similarity of the normalised embeddings. Rows
    must carry real identity labels (drop unlabelled rows first).
    """
    emb = normalize_rows(embeddings)
    e = np.asarray(ers, dtype=np.float64)
    labels = np.asarray(identities)
    if labels.shape != (emb.shape[0],) or e.shape != (emb.shape[0],):
        raise ValueError(
            f"calibrate_gamma_identities: {emb.shape[0]} embeddings, {labels.size} identities, {e.size} ERS values"
        )
    i, j, same, sim = identity_pair_similarities(emb, labels, max_pairs=max_pairs, seed=seed)
    return calibrate_gamma_pairs(sim, e[i], e[j], same, target_far, grid=grid)


def identity_pair_similarities(
    embeddings: npt.ArrayLike, identities: npt.ArrayLike, *, max_pairs: int, seed: int
) -> tuple[IntArray, IntArray, BoolArray, F64]:
    """Pairs from :func:`build_identity_pairs` and their cosine similarities (in chunks of 65,536 pairs,
    so no pairs x dimension matrix is built)."""
    emb = normalize_rows(embeddings)
    i, j, same = build_identity_pairs(np.asarray(identities), max_pairs=max_pairs, seed=seed)
    sim = np.empty(i.size, dtype=np.float64)
    step = 65_536
    for k in range(0, i.size, step):
        sim[k : k + step] = np.einsum("ij,ij->i", emb[i[k : k + step]], emb[j[k : k + step]], dtype=np.float64)
    return i, j, same, sim


def calibrate_gamma_unlabelled(ers_ui_members: npt.ArrayLike, ers_rest: npt.ArrayLike) -> GammaCalibration:
    """Calibrate gamma without identity labels: maximise Youden's J between UI and the rest.

    UI cluster members are taken as the unrecognizable class (negatives), all
    other images as recognizable (positives); an image is called recognizable
    when ``ERS >= gamma``. gamma maximises ``J = TPR - FPR =
    mean(rest >= gamma) - mean(ui >= gamma)``, i.e. balanced accuracy.

    Why this rule: J weighs both classes equally, so it does not depend on the
    UI share (typically 1-20 % of a dataset, where plain accuracy would favour
    "accept everything"); it needs no parametric model of the two ERS
    distributions; and it is stable under the heavy low tail of the "rest"
    (unrecognizable images that just missed the UI cluster). J is piecewise
    constant; gamma is the **midpoint** of the first interval of optimal
    values, so a clean gap between the classes gives a gamma in the middle of
    the gap rather than on a sample.

    ``frr`` = fraction of the rest with ``ERS < gamma`` (recognizable rejected),
    ``far`` = fraction of UI members with ``ERS >= gamma`` (unrecognizable
    accepted), ``threshold`` = NaN.

    Raises ClusteringError when no threshold separates the classes (max J <= 0),
    which means the "UI" cluster is not the unrecognizable one.

    Examples
    --------
    >>> calibrate_gamma_unlabelled([0.02, 0.04, 0.06], [0.5, 0.6, 0.7]).gamma
    0.28
    """
    ui = np.asarray(ers_ui_members, dtype=np.float64).ravel()
    rest = np.asarray(ers_rest, dtype=np.float64).ravel()
    if ui.size == 0 or rest.size == 0:
        raise ValueError(
            f"calibrate_gamma_unlabelled: need UI members and other rows, got {ui.size} and {rest.size}"
        )
    if not (np.all(np.isfinite(ui)) and np.all(np.isfinite(rest))):
        raise ValueError("calibrate_gamma_unlabelled: ERS values must be finite")
    cand = np.unique(np.concatenate([ui, rest]))  # gamma in (cand[k-1], cand[k]] acts like cand[k]
    ui_s = np.sort(ui)
    rest_s = np.sort(rest)
    tpr = 1.0 - np.searchsorted(rest_s, cand, side="left") / rest.size
    fpr = 1.0 - np.searchsorted(ui_s, cand, side="left") / ui.size
    j = tpr - fpr
    jmax = float(j.max())
    if jmax <= 0.0:
        raise ClusteringError(
            "UI members do not have lower ERS than the other rows; the located UI cluster looks wrong"
        )
    k1 = int(np.argmax(j >= jmax - 1e-12))
    k2 = k1
    while k2 + 1 < cand.size and j[k2 + 1] >= jmax - 1e-12:
        k2 += 1
    lower = cand[k1 - 1] if k1 > 0 else cand[k1]
    gamma = float((lower + cand[k2]) / 2.0)
    frr = float(np.mean(rest < gamma))
    far = float(np.mean(ui >= gamma))
    return GammaCalibration(gamma=gamma, frr=frr, far=far, threshold=float("nan"), method="unlabelled-youden")


# --------------------------------------------------------------------------- sub-center label noise


def _spherical_kmeans(x: F64, k: int, seed: int, n_iter: int) -> tuple[F64, IntArray]:
    """Spherical k-means; init: row nearest the mean, then k-means++ (seeded)."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    mean = x.sum(axis=0)
    first = int(np.argmax(x @ mean)) if np.linalg.norm(mean) > 0 else 0
    idx = [first]
    best_sim = x @ x[first]
    for _ in range(1, k):
        d2 = np.clip(1.0 - best_sim, 0.0, None)
        total = d2.sum()
        nxt = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        idx.append(nxt)
        best_sim = np.maximum(best_sim, x @ x[nxt])
    centres = x[idx].copy()
    assign = np.full(n, -1, dtype=np.int64)
    for _ in range(n_iter):
        new = np.argmax(x @ centres.T, axis=1).astype(np.int64)
        if np.array_equal(new, assign):
            break
        assign = new
        sums = np.zeros_like(centres)
        np.add.at(sums, assign, x)
        norms = np.linalg.norm(sums, axis=1)
        ok = norms > 0
        centres[ok] = sums[ok] / norms[ok, None]  # empty cluster keeps its old centre
    return centres, assign


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
    """The dominant (largest) of ``k`` spherical k-means sub-centres of one identity.

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
        centres = _unit_vector(x.sum(axis=0), "mean of identity embeddings")[None, :]
        assign = np.zeros(x.shape[0], dtype=np.int64)
    else:
        centres, assign = _spherical_kmeans(x, k, seed, n_iter)
    dominant = centres[int(np.argmax(np.bincount(assign, minlength=k)))]
    return dominant.astype(np.float32), centres, assign


def _angle_deg(cos: npt.ArrayLike) -> F64:
    return np.degrees(np.arccos(np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0)))


def row_angles(embeddings: npt.ArrayLike, centres: npt.ArrayLike) -> F64:
    """Angle in degrees between each row (normalised here) and the unit centre on the same row.

    >>> row_angles([[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]).round(1).tolist()
    [0.0, 90.0]
    """
    x = normalize_rows(_as_2d_float(embeddings, "embeddings")).astype(np.float64)
    c = _as_2d_float(centres, "centres").astype(np.float64)
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
    centre = _unit_vector(total, "sum of the clean group")
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
    emb = normalize_rows(embeddings).astype(np.float64)
    cent = normalize_rows(centres).astype(np.float64) if len(centre_identity) else np.zeros((0, emb.shape[1]))
    cos = emb @ cent.T
    own = np.asarray(identity, dtype=object)[:, None] == np.asarray(centre_identity, dtype=object)[None, :]
    cos[own] = -np.inf
    if cos.shape[1] == 0:
        return np.full(emb.shape[0], np.inf), np.full(emb.shape[0], None, dtype=object)
    best = np.argmax(cos, axis=1)
    best_cos = cos[np.arange(emb.shape[0]), best]
    found = np.isfinite(best_cos)
    angles = np.where(found, _angle_deg(np.where(found, best_cos, 1.0)), np.inf)
    who = np.where(found, np.asarray(centre_identity, dtype=object)[best], None)
    return angles, who


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
