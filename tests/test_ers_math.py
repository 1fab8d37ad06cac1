"""Tests for ers_spark.core.ers, .calibration, .pairs, .subcentres and the ROC/FAR helpers of .metrics:
expected values are computed independently (by hand or brute force)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import norm

from ers_spark.errors import ClusteringError, ErsUserError
from ers_spark.core.calibration import (
    GammaCalibration,
    calibrate_gamma_identities,
    calibrate_gamma_pairs,
    calibrate_gamma_unlabelled,
)
from ers_spark.core.ers import (
    enhance_embeddings,
    ers_pooling_weights,
    ers_raw,
    ers_scores,
    normalize_rows,
    pool_set,
    ui_centroid,
    ui_centroid_from_sum,
)
from ers_spark.core.metrics import roc_auc, tar_at_far, threshold_at_far
from ers_spark.core.pairs import build_identity_pairs
from ers_spark.core.subcentres import (
    dominant_subcentre,
    impostor_angle_threshold,
    impostor_angles,
    nearest_other_centre,
    subcenter_label_noise,
    subcentre_count,
)
from ers_spark.core.synthetic import sample_vmf

# --------------------------------------------------------------------------- basics


def test_normalize_rows_values_and_dtype() -> None:
    out = normalize_rows(np.array([[3, 4], [0, -2]], dtype=np.int64))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, -1.0]], rtol=1e-6)


def test_normalize_rows_zero_rows_message() -> None:
    with pytest.raises(ValueError, match=r"^normalize_rows: 2 of 3 rows have zero or non-finite norm$"):
        normalize_rows([[0.0, 0.0], [1.0, 0.0], [np.nan, 1.0]])


def test_normalize_rows_rejects_1d() -> None:
    with pytest.raises(ValueError, match=r"must be a 2-D array of shape \(n, d\), got shape \(2,\)"):
        normalize_rows([1.0, 2.0])


def test_normalize_rows_rejects_strings() -> None:
    with pytest.raises(TypeError, match="must be a real numeric array"):
        normalize_rows(np.array([["a", "b"]]))


def test_ui_centroid_is_unit_mean_of_unit_rows() -> None:
    members = [[2.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 10.0]]
    expected = np.array([1.0, 1.0, 1.0]) / math.sqrt(3.0)  # mean of unit rows, normalised
    np.testing.assert_allclose(ui_centroid(members), expected, rtol=1e-6)
    np.testing.assert_allclose(ui_centroid_from_sum([1.0, 1.0, 1.0]), expected, rtol=1e-6)


def test_ui_centroid_from_sum_matches_partial_sums() -> None:
    rng = np.random.default_rng(0)
    x = normalize_rows(rng.normal(size=(50, 8)))
    partials = [x[:20].sum(axis=0), x[20:].sum(axis=0)]  # as executors would
    np.testing.assert_allclose(ui_centroid_from_sum(np.sum(partials, axis=0)), ui_centroid(x), atol=1e-6)


def test_ui_centroid_errors() -> None:
    with pytest.raises(ValueError, match="^ui_centroid: members is empty$"):
        ui_centroid(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="^ui_centroid_from_sum: sum of member embeddings has zero"):
        ui_centroid_from_sum([0.0, 0.0])
    with pytest.raises(ValueError, match="^ui_centroid: members is empty$|has zero"):
        ui_centroid([[1.0, 0.0], [-1.0, 0.0]])


def test_ers_scores_hand_values() -> None:
    emb = [[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]]
    uic = [5.0, 0.0]
    raw = ers_raw(emb, uic)
    np.testing.assert_allclose(raw, [0.0, 1.0, 2.0, 1.0 - 1.0 / math.sqrt(2.0)], atol=1e-7)
    np.testing.assert_allclose(ers_scores(emb, uic), [0.0, 1.0, 1.0, 1.0 - 1.0 / math.sqrt(2.0)], atol=1e-7)
    np.testing.assert_allclose(ers_scores(emb, uic, cap=False), raw)


def test_ers_dimension_mismatch() -> None:
    with pytest.raises(ValueError, match="^ers_raw: embeddings have dimension 2 but uic has 3$"):
        ers_raw([[1.0, 0.0]], [1.0, 0.0, 0.0])


def test_pooling_weights_hand_values() -> None:
    np.testing.assert_allclose(ers_pooling_weights([1.0, 0.5, 0.0]), [0.8, 0.2, 0.0])
    with pytest.raises(ValueError, match="^ers_pooling_weights: all ERS values are zero$"):
        ers_pooling_weights([0.0, 0.0])
    with pytest.raises(ValueError, match="^ers_pooling_weights: ers must be finite and non-negative$"):
        ers_pooling_weights([0.5, -0.1])


def test_pool_set_weights_by_ers_squared() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 1.0]])
    # weights 0.8 / 0.2 -> direction (0.8, 0.2)
    np.testing.assert_allclose(pool_set(emb, [1.0, 0.5]), np.array([0.8, 0.2]) / math.hypot(0.8, 0.2), rtol=1e-6)
    with pytest.raises(ValueError, match="^pool_set: 2 embeddings but 3 ERS values$"):
        pool_set(emb, [1.0, 1.0, 1.0])


def test_pool_set_suppresses_unrecognizable_member() -> None:
    uic = np.array([0.0, 0.0, 1.0])
    good = normalize_rows([[1.0, 0.1, 0.0], [1.0, -0.1, 0.0]])
    bad = normalize_rows([[0.05, 0.0, 1.0]])
    emb = np.vstack([good, bad])
    pooled = pool_set(emb, ers_scores(emb, uic))
    plain = normalize_rows(emb.sum(axis=0, keepdims=True))[0]
    target = np.array([1.0, 0.0, 0.0])
    assert pooled @ target > 0.999
    assert plain @ target < pooled @ target


def test_enhance_embeddings_orthogonal_and_unit() -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(20, 6))
    uic = rng.normal(size=6)
    out = enhance_embeddings(emb, uic)
    u = uic / np.linalg.norm(uic)
    np.testing.assert_allclose(out @ u, 0.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    # independent: Gram-Schmidt of one row by hand
    f = emb[0] / np.linalg.norm(emb[0])
    g = f - (f @ u) * u
    np.testing.assert_allclose(out[0], g / np.linalg.norm(g), atol=1e-6)


def test_enhance_embeddings_parallel_row() -> None:
    with pytest.raises(ValueError, match="^enhance_embeddings: 1 of 2 rows are parallel to the uic$"):
        enhance_embeddings([[2.0, 0.0], [1.0, 1.0]], [1.0, 0.0])
    out = enhance_embeddings([[2.0, 0.0], [1.0, 1.0], [-3.0, 1e-9]], [1.0, 0.0], parallel="nan")
    assert np.isnan(out[[0, 2]]).all()
    np.testing.assert_allclose(out[1], [0.0, 1.0])


# --------------------------------------------------------------------------- metrics


def _auc_brute(s: np.ndarray, p: np.ndarray) -> float:
    pos, neg = s[p], s[~p]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins) / (pos.size * neg.size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = rng.random(300) < 0.3
    s = np.round(rng.normal(size=300) + p * 0.7, 1)  # rounding creates many ties
    assert roc_auc(s, p) == pytest.approx(_auc_brute(s, p), abs=1e-12)


def test_roc_auc_extremes_and_errors() -> None:
    assert roc_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert roc_auc([0.1, 0.2, 0.9], [True, True, False]) == 0.0
    with pytest.raises(ValueError, match="^roc_auc: need at least one positive and one negative$"):
        roc_auc([0.1, 0.2], [True, True])


def test_threshold_and_tar_at_far_brute_force() -> None:
    rng = np.random.default_rng(3)
    imp = np.round(rng.normal(0.0, 0.1, 500), 2)
    gen = rng.normal(0.5, 0.2, 400)
    for far in [0.0, 0.001, 0.01, 0.1, 0.5]:
        t = threshold_at_far(imp, far)
        assert np.mean(imp > t) <= far
        lower = imp[imp < t]
        if lower.size:  # the next lower candidate would exceed the FAR budget
            assert np.mean(imp > lower.max()) > far
        assert tar_at_far(gen, imp, far) == pytest.approx(np.mean(gen > t))
    assert threshold_at_far(imp, 1.0) == float("-inf")
    assert tar_at_far(gen, imp, 1.0) == 1.0


def test_threshold_at_far_errors() -> None:
    with pytest.raises(ValueError, match=r"^threshold_at_far: far must be in \[0, 1\], got 1.5$"):
        threshold_at_far([0.1], 1.5)
    with pytest.raises(ValueError, match="^threshold_at_far: impostor_scores must be a non-empty 1-D array$"):
        threshold_at_far([], 0.1)


# --------------------------------------------------------------------------- gamma calibration


def _calibrate_brute(sim, ea, eb, same, target_far, grid):  # type: ignore[no-untyped-def]
    """Independent: try every gamma x every threshold, keep FAR <= target, min FRR, smallest gamma."""
    n_imp = int((~same).sum())
    n_gen = int(same.sum())
    best = None
    for g in sorted(grid):
        sure = np.minimum(ea, eb) >= g
        best_g = None
        for t in [-np.inf, *np.unique(sim)]:
            acc = sure & (sim > t)
            far = (acc & ~same).sum() / n_imp
            if far <= target_far:
                frr = 1.0 - (acc & same).sum() / n_gen
                if best_g is None or frr < best_g[0]:
                    best_g = (frr, far)
        assert best_g is not None
        if best is None or best_g[0] < best[0] - 1e-12:
            best = (best_g[0], g, best_g[1])
    return best


def _pair_data(seed: int, n: int = 300):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.4
    ea = rng.uniform(0.0, 1.0, n)
    eb = rng.uniform(0.0, 1.0, n)
    low = np.minimum(ea, eb) < 0.25
    sim = np.where(same, rng.normal(0.6, 0.15, n), rng.normal(0.05, 0.1, n))
    # unrecognizable pairs: similarity is uninformative and high for everyone
    sim = np.where(low, rng.normal(0.5, 0.2, n), sim)
    return np.round(sim, 3), ea, eb, same


@pytest.mark.parametrize("seed,target_far", [(0, 0.01), (1, 0.05), (2, 0.0), (3, 0.1)])
def test_calibrate_gamma_pairs_matches_brute_force(seed: int, target_far: float) -> None:
    sim, ea, eb, same = _pair_data(seed)
    grid = np.round(np.linspace(0.0, 0.6, 13), 3)
    res = calibrate_gamma_pairs(sim, ea, eb, same, target_far, grid=grid)
    frr, gamma, far = _calibrate_brute(sim, ea, eb, same, target_far, grid)
    assert isinstance(res, GammaCalibration)
    assert res.method == "pairs-frr-at-far"
    assert res.gamma == pytest.approx(gamma)
    assert res.frr == pytest.approx(frr)
    assert res.far == pytest.approx(far)
    assert res.far <= target_far


def test_calibrate_gamma_pairs_rejects_unrecognizable_pairs() -> None:
    sim, ea, eb, same = _pair_data(5, n=3000)
    res = calibrate_gamma_pairs(sim, ea, eb, same, 0.01)
    base = calibrate_gamma_pairs(sim, ea, eb, same, 0.01, grid=[0.0])
    assert base.gamma == 0.0
    assert res.frr < base.frr
    assert 0.1 < res.gamma < 0.45  # the planted unsure zone is min(ERS) < 0.25


def test_calibrate_gamma_pairs_tie_goes_to_smallest_gamma() -> None:
    # perfectly separable without rejection: every gamma that rejects nothing ties at FRR 0
    sim = [0.9, 0.8, 0.1, 0.2]
    ers = [0.5, 0.6, 0.7, 0.8]
    res = calibrate_gamma_pairs(sim, ers, ers, [True, True, False, False], 0.0, grid=[0.3, 0.1, 0.4])
    assert res.gamma == 0.1 and res.frr == 0.0


def test_calibrate_gamma_pairs_errors() -> None:
    with pytest.raises(ErsUserError, match="^gamma calibration needs genuine and impostor pairs, got 2 genuine and 0"):
        calibrate_gamma_pairs([0.1, 0.2], [1, 1], [1, 1], [True, True], 0.01)
    with pytest.raises(ValueError, match="must be 1-D arrays of equal length"):
        calibrate_gamma_pairs([0.1, 0.2], [1], [1, 1], [True, False], 0.01)


def test_build_identity_pairs_enumerates_all_when_small() -> None:
    labels = np.array(["a", "b", "a", "c", "b", "a"])
    i, j, same = build_identity_pairs(labels, max_pairs=1000)
    got = {(int(a), int(b), bool(s)) for a, b, s in zip(i, j, same)}
    expected = {(a, b, labels[a] == labels[b]) for a, b in itertools.combinations(range(6), 2)}
    assert got == expected
    assert len(got) == i.size  # no duplicates


def test_build_identity_pairs_sampling_is_valid_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 50, 2000)
    i, j, same = build_identity_pairs(labels, max_pairs=1000, seed=7)
    assert same.sum() == 500 and (~same).sum() == 500
    assert np.all(i < j)
    np.testing.assert_array_equal(labels[i] == labels[j], same)
    i2, j2, same2 = build_identity_pairs(labels, max_pairs=1000, seed=7)
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_array_equal(j, j2)


def test_calibrate_gamma_identities_finds_collapsed_images() -> None:
    rng = np.random.default_rng(0)
    dim, n_id, per = 32, 40, 8
    centres = normalize_rows(rng.normal(size=(n_id, dim)))
    labels = np.repeat(np.arange(n_id), per)
    emb = sample_vmf(centres[labels], 150.0, rng)
    uic_true = normalize_rows(rng.normal(size=(1, dim)))[0]
    bad = rng.random(labels.size) < 0.2  # unrecognizable images collapse onto the UI
    emb[bad] = sample_vmf(np.repeat(uic_true[None], bad.sum(), axis=0), 150.0, rng)
    ers = ers_scores(emb, ui_centroid(emb[bad]))
    res = calibrate_gamma_identities(emb, labels, ers, target_far=0.01, max_pairs=40_000)
    base = calibrate_gamma_identities(emb, labels, ers, target_far=0.01, max_pairs=40_000, grid=[0.0])
    gap = (ers[bad].max() + ers[~bad].min()) / 2.0  # oracle: reject exactly the collapsed images
    oracle = calibrate_gamma_identities(emb, labels, ers, target_far=0.01, max_pairs=40_000, grid=[gap])
    assert res.frr < base.frr - 0.2
    assert res.frr <= oracle.frr + 1e-12
    assert 0.0 < res.gamma <= gap
    assert res.far <= 0.01


def test_calibrate_gamma_identities_shape_error() -> None:
    with pytest.raises(ValueError, match="^calibrate_gamma_identities: 2 embeddings, 3 identities, 2 ERS values$"):
        calibrate_gamma_identities([[1.0, 0.0], [0.0, 1.0]], [1, 2, 3], [0.5, 0.5], 0.01)


def test_calibrate_gamma_unlabelled_gap_midpoint() -> None:
    res = calibrate_gamma_unlabelled([0.01, 0.05, 0.1], [0.3, 0.7, 0.9])
    assert res.gamma == pytest.approx(0.2)
    assert res.frr == 0.0 and res.far == 0.0
    assert res.method == "unlabelled-youden" and math.isnan(res.threshold)


@pytest.mark.parametrize("ui_share", [0.02, 0.1, 0.4])
def test_calibrate_gamma_unlabelled_near_youden_optimum(ui_share: float) -> None:
    rng = np.random.default_rng(4)
    n = 20_000
    n_ui = int(n * ui_share)
    ui = rng.normal(0.08, 0.03, n_ui)
    rest = rng.normal(0.45, 0.12, n - n_ui)
    # independent optimum of J on the true distributions
    g = np.linspace(0.0, 0.6, 60_001)
    j = norm.cdf(g, 0.08, 0.03) - norm.cdf(g, 0.45, 0.12)
    g_star = g[np.argmax(j)]
    res = calibrate_gamma_unlabelled(ui, rest)
    assert abs(res.gamma - g_star) < 0.03  # independent of the UI share
    assert res.frr == pytest.approx(np.mean(rest < res.gamma))
    assert res.far == pytest.approx(np.mean(ui >= res.gamma))


def test_calibrate_gamma_unlabelled_robust_to_low_tail_of_rest() -> None:
    rng = np.random.default_rng(5)
    ui = rng.normal(0.08, 0.03, 1000)
    # 10 % of the rest are unrecognizable images that missed the UI cluster
    rest = np.concatenate([rng.normal(0.45, 0.12, 9000), rng.normal(0.1, 0.04, 1000)])
    res = calibrate_gamma_unlabelled(ui, rest)
    assert 0.12 < res.gamma < 0.25


def test_calibrate_gamma_unlabelled_errors() -> None:
    with pytest.raises(ClusteringError, match="^UI members do not have lower ERS than the other rows"):
        calibrate_gamma_unlabelled([0.8, 0.9], [0.1, 0.2])
    with pytest.raises(ValueError, match="^calibrate_gamma_unlabelled: need UI members and other rows, got 0 and 2$"):
        calibrate_gamma_unlabelled([], [0.1, 0.2])


# --------------------------------------------------------------------------- sub-center label noise


def _loo_angles_brute_force(x: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Angle of each row to the unit mean of the group's rows other than itself, one row at a time."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for i in range(len(x)):
        members = [j for j in range(len(x)) if group[j] and j != i]
        ref = x[members].sum(axis=0) if members else x[i]
        out.append(math.degrees(math.acos(max(-1.0, min(1.0, float(x[i] @ ref / np.linalg.norm(ref)))))))
    return np.array(out)


def test_subcenter_label_noise_drops_mislabelled_samples() -> None:
    rng = np.random.default_rng(0)
    dim = 64
    c_true, c_noise = normalize_rows(rng.normal(size=(2, dim)))
    clean = sample_vmf(np.repeat(c_true[None], 80, axis=0), 200.0, rng)
    noise = sample_vmf(np.repeat(c_noise[None], 20, axis=0), 200.0, rng)
    x = np.vstack([clean, noise])
    keep, ang, dom = subcenter_label_noise(x, k=3, max_angle_deg=75.0, seed=0)
    assert keep[:80].all() and not keep[80:].any()
    assert float(dom @ c_true) > 0.95
    _, _, assign = dominant_subcentre(x, 3, seed=0)
    group = np.isin(assign, np.unique(assign[:80]))  # the clean sub-centres, all within 75 deg of each other
    np.testing.assert_allclose(ang, _loo_angles_brute_force(x.astype(np.float64), group), atol=1e-3)
    keep2, ang2, dom2 = subcenter_label_noise(x, k=3, max_angle_deg=75.0, seed=0)
    np.testing.assert_array_equal(keep, keep2)
    np.testing.assert_array_equal(dom, dom2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subcenter_label_noise_matches_brute_force(seed: int) -> None:
    """Group = sub-centres within the angle of the dominant one; angles leave-one-out to the group mean."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(30, 8)) + np.array([3.0] + [0.0] * 7)
    max_angle = 40.0
    keep, ang, centre = subcenter_label_noise(x, k=3, max_angle_deg=max_angle, seed=seed)
    dom, centres, assign = dominant_subcentre(x, 3, seed=seed)
    near = [c for c in range(3) if math.degrees(math.acos(min(1.0, float(centres[c] @ dom)))) <= max_angle + 1e-9]
    group = np.isin(assign, near) | (assign == np.argmax(np.bincount(assign, minlength=3)))
    expected = _loo_angles_brute_force(x, group)
    np.testing.assert_allclose(ang, expected, atol=1e-4)  # float32 normalisation
    np.testing.assert_array_equal(keep, expected <= max_angle)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(centre, unit[group].sum(0) / np.linalg.norm(unit[group].sum(0)), atol=1e-6)


def test_clean_faces_split_by_kmeans_are_not_flagged() -> None:
    """k-means splits one clean identity into 3; the other sub-clusters are the same person (within the angle)."""
    rng = np.random.default_rng(3)
    x = sample_vmf(np.repeat(normalize_rows(rng.normal(size=(1, 64))), 30, axis=0), 60.0, rng)
    genuine_max = float(np.max(_loo_angles_brute_force(x.astype(np.float64), np.ones(30, bool))))
    _, _, assign = dominant_subcentre(x, 3)
    assert len(np.unique(assign)) == 3
    keep, _, _ = subcenter_label_noise(x, k=3, max_angle_deg=genuine_max + 1.0)
    assert keep.all()


def test_mislabelled_image_cannot_pull_its_own_reference() -> None:
    """3 images of A and one of B labelled A: leave-one-out puts B at its true angle to A's images."""
    a = np.array([1.0, 0.0])
    x = np.array([a, a, a, [0.0, 1.0]])
    keep, ang, _ = subcenter_label_noise(x, k=1, max_angle_deg=60.0)
    a_to_rest = math.degrees(math.atan(0.5))  # a vs 2a + b
    np.testing.assert_allclose(ang, [a_to_rest, a_to_rest, a_to_rest, 90.0], atol=1e-6)
    assert keep.tolist() == [True, True, True, False]  # with itself in the mean it would sit at 71.6 deg: missed at 75


def test_subcentre_count() -> None:
    assert [subcentre_count(n, 3, 10) for n in (1, 9, 10, 19, 20, 29, 30, 500)] == [1, 1, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="must be >= 1"):
        subcentre_count(10, 0, 10)


def test_impostor_angles_and_threshold_brute_force() -> None:
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(12, 6))
    ident = np.array(list("aaabbbcccddd"))
    centres = rng.normal(size=(4, 6))
    cid = np.array(list("abcd"))
    expected = []
    for i in range(12):
        for j in range(4):
            if ident[i] != cid[j]:
                cos = emb[i] @ centres[j] / np.linalg.norm(emb[i]) / np.linalg.norm(centres[j])
                expected.append(math.degrees(math.acos(cos)))
    got = impostor_angles(emb, ident, centres, cid)
    np.testing.assert_allclose(np.sort(got), np.sort(expected), atol=1e-9)
    assert impostor_angle_threshold(got, 5.0) == pytest.approx(np.percentile(expected, 5.0))
    with pytest.raises(ValueError, match="at least two identities"):
        impostor_angle_threshold([], 5.0)
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\)"):
        impostor_angle_threshold([1.0], 100.0)


def test_subcenter_label_noise_errors() -> None:
    with pytest.raises(ValueError, match="^subcenter_label_noise: k must be >= 1, got 0$"):
        subcenter_label_noise([[1.0, 0.0]], k=0)
    with pytest.raises(ValueError, match="^subcenter_label_noise: embeddings is empty$"):
        subcenter_label_noise(np.zeros((0, 2)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_other_centre_matches_brute_force(seed: int) -> None:
    """Per image, the smallest angle to a centre of another identity, and that identity (loop over all centres)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(20, 8))
    centres = rng.normal(size=(5, 8))
    centre_identity = ["a", "b", "c", "d", "e"]
    identity = [centre_identity[i % 5] for i in range(20)]
    angles, who = nearest_other_centre(x, identity, centres, centre_identity)
    for i in range(20):
        best = min(
            (np.degrees(np.arccos(np.clip(x[i] @ c / np.linalg.norm(x[i]) / np.linalg.norm(c), -1, 1))), name)
            for c, name in zip(centres, centre_identity) if name != identity[i]
        )
        assert angles[i] == pytest.approx(best[0], abs=1e-4) and who[i] == best[1]


def test_nearest_other_centre_without_another_identity_is_inf() -> None:
    angles, who = nearest_other_centre([[1.0, 0.0]], ["a"], [[1.0, 0.0]], ["a"])
    assert angles.tolist() == [np.inf] and who.tolist() == [None]
