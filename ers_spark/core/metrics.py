"""Recognition metrics with recognizability: what ERS does for verification, search and set pooling.

Pure numpy on arrays of comparison scores (the evaluate stage computes the scores
on Spark and collects only these few floats per pair). Conventions:

* a comparison is **accepted** when its score is strictly above the threshold
  (as :func:`threshold_at_far`);
* a pair is **unsure** when ``min(ERS_a, ERS_b) < gamma`` (paper sec. 3.4); an
  unsure comparison is never accepted. Counting it as a rejection gives the
  generalised rates of ISO/IEC 19795-1, with the unsure share as the failure to
  acquire (FTA): ``FRR = FTA + FNMR (1 - FTA)``, ``FAR = FMR (1 - FTA)``; a
  score of ``-inf`` for every unsure pair gives exactly those rates with the
  plain formulas, which is how they are computed here;
* an operating point ``far=f`` needs at least ``1 / f`` negatives (one false
  accept must be possible); :func:`supported_rates` says which are.
"""


from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

__all__ = [
    "OperatingPoint",
    "GeneralisedRates",
    "as_scores",
    "as_mask",
    "roc_auc",
    "threshold_at_far",
    "tar_at_far",
    "operating_point_label",
    "supported_rates",
    "verification_at_far",
    "det_curve",
    "unsure_scores",
    "generalised_rates",
    "unsure_as_reject_at_far",
    "sure_only_at_far",
    "rank1_mate_scores",
    "fnir_at_fpir",
    "POOLING_METHODS",
    "pooling_weights",
    "pool_template",
    "edc_curve",
    "partial_area",
]

F64 = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

POOLING_METHODS: tuple[str, ...] = ("uniform", "ers", "ers2", "softmax", "topk")


@dataclass(frozen=True)
class OperatingPoint:
    """Error rates at one threshold.

    ``accept_rate`` is TAR (verification) or 1 - FNIR (identification);
    ``reject_rate`` = 1 - accept_rate is FRR / FNIR; ``false_accept_rate`` is the
    FAR / FPIR actually reached (at most the target); the counts are the
    positives and negatives the rates are computed on.
    """

    threshold: float
    accept_rate: float
    reject_rate: float
    false_accept_rate: float
    n_positive: int
    n_negative: int


@dataclass(frozen=True)
class GeneralisedRates:
    """ISO/IEC 19795-1 rates with unsure comparisons as failures to acquire (FTA)."""

    fta_genuine: float
    fta_impostor: float
    fnmr: float  # on sure genuine pairs (NaN when none is sure)
    fmr: float  # on sure impostor pairs (NaN when none is sure)
    frr: float  # FTA_g + FNMR (1 - FTA_g)
    far: float  # FMR (1 - FTA_i)


def as_scores(x: npt.ArrayLike, name: str, allow_empty: bool = False) -> F64:
    """``x`` as a 1-D float64 array without NaN (non-empty unless ``allow_empty``), or the error naming it."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def as_mask(x: npt.ArrayLike | None, n: int, name: str) -> BoolArray:
    """``x`` as a boolean array of shape ``(n,)`` (all False when None), or the error naming it."""
    if x is None:
        return np.zeros(n, dtype=bool)
    arr = np.asarray(x, dtype=bool)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    return arr



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


def operating_point_label(name: str, value: float) -> str:
    """``far=1e-2`` for powers of ten, ``far=0.05`` otherwise (the eval_metrics ``operating_point``).

    Examples
    --------
    >>> operating_point_label("far", 0.01), operating_point_label("fpir", 0.1), operating_point_label("far", 0.05)
    ('far=1e-2', 'fpir=1e-1', 'far=0.05')
    """
    if value > 0:
        exponent = math.floor(math.log10(value) + 1e-12)
        if math.isclose(value, 10.0**exponent, rel_tol=1e-9):
            return f"{name}=1e{exponent}"
    return f"{name}={value:g}"


def supported_rates(n_negatives: int, rates: Sequence[float]) -> tuple[list[float], list[float]]:
    """Split target FAR/FPIR values into (supported, unsupported) for ``n_negatives`` comparisons.

    A rate ``r`` is supported when ``floor(r * n) >= 1``: below that no false
    accept is allowed, and the threshold only says "above every negative".

    Examples
    --------
    >>> supported_rates(1000, [0.1, 0.01, 0.001, 0.0001])
    ([0.1, 0.01, 0.001], [0.0001])
    """
    supported = [r for r in rates if math.floor(r * n_negatives + 1e-9) >= 1]
    return supported, [r for r in rates if r not in supported]


def verification_at_far(genuine: npt.ArrayLike, impostor: npt.ArrayLike, far: float) -> OperatingPoint:
    """TAR and FRR at the threshold where at most ``far`` of the impostors are accepted."""
    gen = as_scores(genuine, "genuine scores")
    imp = as_scores(impostor, "impostor scores")
    t = threshold_at_far(imp, far)
    tar = float(np.mean(gen > t))
    return OperatingPoint(t, tar, 1.0 - tar, float(np.mean(imp > t)), gen.size, imp.size)


def det_curve(genuine: npt.ArrayLike, impostor: npt.ArrayLike, max_points: int) -> tuple[F64, F64]:
    """DET points ``(FAR, FRR)`` at every distinct threshold, thinned to at most ``max_points``.

    Thresholds are ``-inf`` and every finite score; a ``-inf`` score (an unsure
    pair) is never accepted. Points are ordered by increasing threshold (FAR
    falling, FRR rising); thinning keeps both ends and evenly spaced ranks between.
    """
    gen = np.sort(as_scores(genuine, "genuine scores"))
    imp = np.sort(as_scores(impostor, "impostor scores"))
    if max_points < 2:
        raise ValueError(f"det_curve: max_points must be >= 2, got {max_points}")
    both = np.concatenate([gen, imp])
    thresholds = np.concatenate([[-np.inf], np.unique(both[np.isfinite(both)])])
    far = 1.0 - np.searchsorted(imp, thresholds, side="right") / imp.size
    frr = np.searchsorted(gen, thresholds, side="right") / gen.size
    if thresholds.size > max_points:
        keep = np.unique(np.round(np.linspace(0, thresholds.size - 1, max_points)).astype(np.int64))
        far, frr = far[keep], frr[keep]
    return far, frr


def unsure_scores(scores: npt.ArrayLike, unsure: npt.ArrayLike) -> F64:
    """Scores with every unsure comparison set to ``-inf`` (never accepted)."""
    s = as_scores(scores, "scores", allow_empty=True)
    return np.where(as_mask(unsure, s.size, "unsure"), -np.inf, s)


def generalised_rates(
    genuine: npt.ArrayLike, genuine_unsure: npt.ArrayLike, impostor: npt.ArrayLike, impostor_unsure: npt.ArrayLike,
    threshold: float,
) -> GeneralisedRates:
    """ISO/IEC 19795-1 generalised FRR and FAR at ``threshold`` with unsure pairs as FTA.

    Examples
    --------
    >>> r = generalised_rates([0.9, 0.2, 0.8, 0.7], [False, False, True, False], [0.6, 0.1], [False, True], 0.5)
    >>> r.fta_genuine, round(r.fnmr, 4), r.frr, r.fmr, r.far
    (0.25, 0.3333, 0.5, 1.0, 0.5)
    """
    gen = as_scores(genuine, "genuine scores")
    imp = as_scores(impostor, "impostor scores")
    gen_u = as_mask(genuine_unsure, gen.size, "genuine_unsure")
    imp_u = as_mask(impostor_unsure, imp.size, "impostor_unsure")
    fta_g, fta_i = float(gen_u.mean()), float(imp_u.mean())
    fnmr = float(np.mean(gen[~gen_u] <= threshold)) if (~gen_u).any() else float("nan")
    fmr = float(np.mean(imp[~imp_u] > threshold)) if (~imp_u).any() else float("nan")
    frr = fta_g + (fnmr * (1.0 - fta_g) if not math.isnan(fnmr) else 0.0)
    far = fmr * (1.0 - fta_i) if not math.isnan(fmr) else 0.0
    return GeneralisedRates(fta_g, fta_i, fnmr, fmr, frr, far)


def unsure_as_reject_at_far(
    genuine: npt.ArrayLike, genuine_unsure: npt.ArrayLike, impostor: npt.ArrayLike, impostor_unsure: npt.ArrayLike,
    far: float,
) -> OperatingPoint:
    """Generalised TAR/FRR at generalised FAR <= ``far``: unsure pairs are rejections, counted in every rate.

    The FAR budget is over **all** impostors, so each unsure impostor (a correct
    rejection) buys room for a lower threshold (as the paper's calibration).
    """
    return verification_at_far(unsure_scores(genuine, genuine_unsure), unsure_scores(impostor, impostor_unsure), far)


def sure_only_at_far(
    genuine: npt.ArrayLike, genuine_unsure: npt.ArrayLike, impostor: npt.ArrayLike, impostor_unsure: npt.ArrayLike,
    far: float,
) -> OperatingPoint:
    """TAR/FRR and FAR on the sure pairs only (unsure pairs set aside, as a system answering "unsure" would)."""
    gen = as_scores(genuine, "genuine scores")
    imp = as_scores(impostor, "impostor scores")
    gen_sure = gen[~as_mask(genuine_unsure, gen.size, "genuine_unsure")]
    imp_sure = imp[~as_mask(impostor_unsure, imp.size, "impostor_unsure")]
    if gen_sure.size == 0 or imp_sure.size == 0:
        raise ValueError(f"sure_only_at_far: {gen_sure.size} sure genuine and {imp_sure.size} sure impostor pairs")
    return verification_at_far(gen_sure, imp_sure, far)


def rank1_mate_scores(similarity: npt.ArrayLike, probe_labels: npt.ArrayLike, gallery_labels: npt.ArrayLike) -> tuple[F64, F64]:
    """Per probe: the mate's score when the mate is ranked first (ties count as first) else ``-inf``, and the top score.

    The reference for the stage's Spark aggregation (one gallery entry per identity).
    """
    sim = np.asarray(similarity, dtype=np.float64)
    probes = np.asarray(probe_labels)
    gallery = np.asarray(gallery_labels)
    if sim.shape != (probes.size, gallery.size):
        raise ValueError(f"rank1_mate_scores: similarity {sim.shape} vs {probes.size} probes x {gallery.size} gallery")
    top = sim.max(axis=1)
    is_mate = probes[:, None] == gallery[None, :]
    mate = np.where(is_mate, sim, -np.inf).max(axis=1)
    return np.where(mate >= top, mate, -np.inf), top


def fnir_at_fpir(
    mated_rank1_scores: npt.ArrayLike, nonmated_top_scores: npt.ArrayLike, fpir: float, *,
    mated_rejected: npt.ArrayLike | None = None, nonmated_rejected: npt.ArrayLike | None = None,
) -> OperatingPoint:
    """Open-set FNIR at FPIR <= ``fpir`` (rank 1), optionally with probe rejection.

    ``mated_rank1_scores``: per mated probe, its mate's score when ranked first,
    else ``-inf`` (:func:`rank1_mate_scores`). ``nonmated_top_scores``: per
    non-mated probe, its best gallery score. A rejected mated probe is a miss; a
    rejected non-mated probe is a correct non-match (both stay in the denominators).
    """
    mated = unsure_scores(mated_rank1_scores, mated_rejected)
    nonmated = unsure_scores(nonmated_top_scores, nonmated_rejected)
    if mated.size == 0 or nonmated.size == 0:
        raise ValueError(f"fnir_at_fpir: {mated.size} mated and {nonmated.size} non-mated probes")
    return verification_at_far(mated, nonmated, fpir)


def pooling_weights(ers: npt.ArrayLike, method: str, *, temperature: float, top_k: int) -> F64:
    """Weights of a set's members for template pooling (paper Table 5 rows); they sum to 1.

    ``uniform``: equal; ``ers``: proportional to ERS; ``ers2``: to ERS^2;
    ``softmax``: softmax(ERS / temperature); ``topk``: equal over the ``top_k``
    highest ERS (ties to the earlier member). A set whose ERS are all zero has no
    preferred member, so ``ers`` and ``ers2`` weigh it uniformly.

    Examples
    --------
    >>> pooling_weights([0.5, 0.5, 0.0], "ers2", temperature=1.0, top_k=1).tolist()
    [0.5, 0.5, 0.0]
    >>> pooling_weights([0.2, 0.9, 0.4], "topk", temperature=1.0, top_k=2).tolist()
    [0.0, 0.5, 0.5]
    """
    e = as_scores(ers, "ers")
    if method not in POOLING_METHODS:
        raise ValueError(f"pooling_weights: method must be one of {', '.join(POOLING_METHODS)}, got {method!r}")
    if method == "uniform":
        w = np.ones_like(e)
    elif method in ("ers", "ers2"):
        w = np.clip(e, 0.0, None) ** (1 if method == "ers" else 2)
        if w.sum() == 0.0:
            w = np.ones_like(e)
    elif method == "softmax":
        if temperature <= 0:
            raise ValueError(f"pooling_weights: temperature must be > 0, got {temperature}")
        w = np.exp((e - e.max()) / temperature)
    else:
        if top_k < 1:
            raise ValueError(f"pooling_weights: top_k must be >= 1, got {top_k}")
        w = np.zeros_like(e)
        w[np.argsort(-e, kind="stable")[:top_k]] = 1.0
    return w / w.sum()


def pool_template(embeddings: npt.ArrayLike, ers: npt.ArrayLike, method: str, *, temperature: float, top_k: int) -> F64:
    """Unit weighted mean of a set's unit embeddings (the template's feature)."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != np.asarray(ers).size:
        raise ValueError(f"pool_template: embeddings {emb.shape} and {np.asarray(ers).size} ERS values")
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    pooled = pooling_weights(ers, method, temperature=temperature, top_k=top_k) @ emb
    norm = float(np.linalg.norm(pooled))
    if norm < 1e-12:
        raise ValueError("pool_template: the weighted members cancel out (zero-norm template)")
    return pooled / norm


def edc_curve(
    genuine: npt.ArrayLike, quality: npt.ArrayLike, threshold: float, discard_fractions: npt.ArrayLike
) -> F64:
    """Error-versus-discard (ISO/IEC 29794-1): FNMR of the genuine pairs left after discarding the lowest-quality share.

    For each fraction ``f`` the ``floor(f * n)`` genuine pairs of lowest quality
    are dropped (ties to the earlier pair) and FNMR = share of the rest with
    score <= ``threshold`` (fixed beforehand, e.g. at FMR = 1e-2 on all pairs).
    """
    gen = as_scores(genuine, "genuine scores")
    q = as_scores(quality, "quality")
    fractions = np.asarray(discard_fractions, dtype=np.float64)
    if q.shape != gen.shape:
        raise ValueError(f"edc_curve: {gen.size} scores but {q.size} quality values")
    if fractions.ndim != 1 or np.any((fractions < 0) | (fractions >= 1)):
        raise ValueError("edc_curve: discard fractions must be a 1-D array in [0, 1)")
    rejected = (gen[np.argsort(q, kind="stable")] <= threshold).astype(np.float64)
    tail_errors = np.concatenate([np.cumsum(rejected[::-1])[::-1], [0.0]])  # errors among positions k..n-1
    dropped = np.floor(fractions * gen.size + 1e-9).astype(np.int64)
    return tail_errors[dropped] / (gen.size - dropped)


def partial_area(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Trapezoid area under ``y(x)`` over the range of ``x`` (x increasing): the EDC's partial AUC."""
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.ndim != 1 or xs.shape != ys.shape or xs.size < 2 or np.any(np.diff(xs) <= 0):
        raise ValueError("partial_area: x and y must be 1-D of equal length >= 2 with x increasing")
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
