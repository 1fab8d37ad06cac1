"""Gamma calibration: the ERS below which an image is rejected as unrecognizable.

``gamma`` depends on the model, so it is chosen on data:

* with identity labels, the paper's rule: the gamma with the lowest false reject rate at a
  fixed false accept rate, unsure pairs (``min(ERS_a, ERS_b) < gamma``) rejected
  (:func:`calibrate_gamma_pairs` on pairs, :func:`calibrate_gamma_identities` on labelled
  embeddings, :func:`calibrate_gamma_split` on the calibration share of the pairs);
* :func:`calibrate_gamma_held_out` chooses it on one share of the identities
  (:func:`calibration_identities`: a seeded hash of each identity's name, so an identity lands
  on the same side in every process and sample; evaluate draws the same split on Spark with
  :func:`ers_spark.distributed.calibration.calibration_identity`) and measures it on the others;
* without labels, :func:`calibrate_gamma_unlabelled` best separates the UI cluster's members
  from the other images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ers_spark.core.ers import normalize_rows
from ers_spark.core.metrics import as_mask, as_scores, supported_rates, unsure_as_reject_at_far, verification_at_far
from ers_spark.core.pairs import identity_pair_similarities
from ers_spark.errors import ClusteringError, ErsUserError

__all__ = [
    "GammaCalibration",
    "calibrate_gamma_pairs",
    "calibrate_gamma_identities",
    "calibrate_gamma_unlabelled",
    "calibrate_gamma_split",
    "HeldOutCheck",
    "calibration_identities",
    "calibrate_gamma_held_out",
]

F64 = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


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

    Pairs come from :func:`~ers_spark.core.pairs.build_identity_pairs` (deterministic for a seed);
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


def calibrate_gamma_split(
    sim: npt.ArrayLike, ers_a: npt.ArrayLike, ers_b: npt.ArrayLike, is_same: npt.ArrayLike,
    calibration: npt.ArrayLike, target_far: float, grid: npt.ArrayLike | None = None,
) -> GammaCalibration:
    """The paper's gamma on the calibration pairs only (minimum FRR at ``target_far``, unsure counted as rejected).

    ``calibration`` marks the pairs whose identities were drawn for calibration;
    the returned gamma is then evaluated on the other pairs by the caller.
    """
    s = as_scores(sim, "sim")
    mask = as_mask(calibration, s.size, "calibration")
    same = as_mask(is_same, s.size, "is_same")
    n_gen, n_imp = int((mask & same).sum()), int((mask & ~same).sum())
    if n_gen == 0 or n_imp == 0:
        raise ErsUserError(
            f"gamma calibration has {n_gen} genuine and {n_imp} impostor pairs on the calibration identities; "
            "raise evaluate.calibration_share or label more identities"
        )
    ea = np.asarray(ers_a, dtype=np.float64)
    eb = np.asarray(ers_b, dtype=np.float64)
    return calibrate_gamma_pairs(s[mask], ea[mask], eb[mask], same[mask], target_far, grid=grid)


@dataclass(frozen=True)
class HeldOutCheck:
    """What a calibrated gamma does on identities it was not chosen on, at the target FAR."""

    frr_baseline: float  # plain verification
    frr_unsure_as_reject: float  # with gamma, unsure pairs rejected
    unsure_rate_genuine: float
    genuine_pairs: int
    impostor_pairs: int


def calibration_identities(identities: npt.ArrayLike, share: float, seed: int) -> BoolArray:
    """Per row: whether its identity is drawn for calibration (about ``share`` of the identities).

    The draw hashes ``seed`` and the identity's name, so an identity lands on the same side in
    every process and sample.

    >>> calibration_identities(["a", "b", "a"], 1.0, 0).tolist()
    [True, True, True]
    """
    labels = np.asarray(identities, dtype=object)
    names, inverse = np.unique(labels.astype(str), return_inverse=True)
    draw = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{n}".encode()).digest()[:8], "big") / 2.0**64
                     for n in names])
    return (draw < share)[inverse.ravel()]


def _held_out_check(sim: F64, q: F64, same: BoolArray, ev: BoolArray, gamma: float, far: float) -> HeldOutCheck | None:
    """FRR at ``far`` on the evaluation pairs, without and with gamma (None when they cannot support ``far``)."""
    gen, imp = sim[ev & same], sim[ev & ~same]
    if gen.size == 0 or not supported_rates(imp.size, [far])[0]:
        return None
    gen_u, imp_u = q[ev & same] < gamma, q[ev & ~same] < gamma
    return HeldOutCheck(
        frr_baseline=verification_at_far(gen, imp, far).reject_rate,
        frr_unsure_as_reject=unsure_as_reject_at_far(gen, gen_u, imp, imp_u, far).reject_rate,
        unsure_rate_genuine=float(gen_u.mean()), genuine_pairs=int(gen.size), impostor_pairs=int(imp.size),
    )


def calibrate_gamma_held_out(
    embeddings: npt.ArrayLike, identities: npt.ArrayLike, ers: npt.ArrayLike, *,
    target_far: float, calibration_share: float, seed: int, max_pairs: int = 200_000,
) -> tuple[GammaCalibration, HeldOutCheck | None]:
    """The paper's gamma on calibration identities (:func:`calibrate_gamma_split`), checked on the others.

    Pairs come from :func:`~ers_spark.core.pairs.build_identity_pairs`; a pair is a calibration pair
    when both identities are calibration identities (:func:`calibration_identities`) and an
    evaluation pair when neither is. The check is None when the evaluation pairs cannot support
    ``target_far`` (too few impostors or no genuine pair).
    """
    e = np.asarray(ers, dtype=np.float64)
    i, j, same, sim = identity_pair_similarities(embeddings, identities, max_pairs=max_pairs, seed=seed)
    q = np.minimum(e[i], e[j])
    cal_row = calibration_identities(identities, calibration_share, seed)
    calibration = calibrate_gamma_split(sim, q, q, same, cal_row[i] & cal_row[j], target_far)
    ev = ~cal_row[i] & ~cal_row[j]
    return calibration, _held_out_check(sim, q, same, ev, calibration.gamma, target_far)
