"""Recognition metrics (ers_spark.core.metrics) and the split / held-out gamma calibrations
(ers_spark.core.calibration) against brute force and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ers_spark.core import calibration as calib
from ers_spark.core import metrics as m
from ers_spark.core.calibration import calibrate_gamma_pairs
from ers_spark.core.pairs import build_identity_pairs
from ers_spark.errors import ErsUserError


def _scores(seed: int, n_gen: int = 60, n_imp: int = 400, ties: bool = False):
    rng = np.random.default_rng(seed)
    gen = rng.normal(0.6, 0.2, n_gen)
    imp = rng.normal(0.1, 0.2, n_imp)
    if ties:
        gen, imp = np.round(gen, 1), np.round(imp, 1)
    return gen, imp


def _brute_threshold(imp: np.ndarray, far: float) -> float:
    """Smallest candidate t (an impostor score or -inf) with mean(imp > t) <= far."""
    for t in sorted({-np.inf, *imp.tolist()}):
        if np.mean(imp > t) <= far + 1e-12:
            return t
    raise AssertionError("unreachable")


@pytest.mark.parametrize(("name", "value", "label"), [
    ("far", 0.1, "far=1e-1"), ("far", 1e-4, "far=1e-4"), ("fpir", 0.01, "fpir=1e-2"), ("far", 0.05, "far=0.05"),
    ("far", 1.0, "far=1e0"),
])
def test_operating_point_label(name: str, value: float, label: str) -> None:
    assert m.operating_point_label(name, value) == label


@pytest.mark.parametrize(("n", "supported"), [(9, []), (10, [0.1]), (99, [0.1]), (100, [0.1, 0.01]),
                                              (10_000, [0.1, 0.01, 0.001, 0.0001])])
def test_supported_rates_need_one_allowed_false_accept(n: int, supported: list[float]) -> None:
    rates = [0.1, 0.01, 0.001, 0.0001]
    got, missing = m.supported_rates(n, rates)
    assert got == supported and missing == [r for r in rates if r not in supported]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("far", [0.1, 0.01, 0.0025])
def test_verification_at_far_matches_brute_force(seed: int, ties: bool, far: float) -> None:
    gen, imp = _scores(seed, ties=ties)
    point = m.verification_at_far(gen, imp, far)
    t = _brute_threshold(imp, far)
    assert point.threshold == t
    assert point.accept_rate == pytest.approx(np.mean(gen > t))
    assert point.reject_rate == pytest.approx(1 - np.mean(gen > t))
    assert point.false_accept_rate == pytest.approx(np.mean(imp > t)) and point.false_accept_rate <= far
    assert (point.n_positive, point.n_negative) == (gen.size, imp.size)


@pytest.mark.parametrize("ties", [False, True])
def test_det_curve_matches_brute_force(ties: bool) -> None:
    gen, imp = _scores(3, n_gen=30, n_imp=50, ties=ties)
    gen[:3] = -np.inf  # unsure pairs: never accepted
    far, frr = m.det_curve(gen, imp, max_points=10_000)
    thresholds = [-np.inf, *sorted(set(np.concatenate([gen, imp])[np.isfinite(np.concatenate([gen, imp]))]))]
    np.testing.assert_allclose(far, [np.mean(imp > t) for t in thresholds])
    np.testing.assert_allclose(frr, [np.mean(gen <= t) for t in thresholds])
    thin_far, thin_frr = m.det_curve(gen, imp, max_points=7)
    assert thin_far.size == 7 and thin_far[0] == far[0] and thin_frr[-1] == frr[-1]
    assert np.all(np.diff(thin_far) <= 0) and np.all(np.diff(thin_frr) >= 0)


def test_generalised_rates_hand_case() -> None:
    # genuine: one unsure of 4 (FTA 1/4); of the 3 sure, 0.2 is rejected at t=0.5 (FNMR 1/3)
    # impostors: one unsure of 2 (FTA 1/2); the sure one (0.6) is accepted (FMR 1)
    r = m.generalised_rates([0.9, 0.2, 0.8, 0.7], [False, False, True, False], [0.6, 0.1], [False, True], 0.5)
    assert (r.fta_genuine, r.fta_impostor, r.fmr) == (0.25, 0.5, 1.0)
    assert r.fnmr == pytest.approx(1 / 3)
    assert r.frr == pytest.approx(0.25 + (1 / 3) * 0.75) and r.far == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [-0.1, 0.3, 0.55])
def test_generalised_rates_equal_plain_rates_with_unsure_as_minus_inf(seed: int, threshold: float) -> None:
    gen, imp = _scores(seed)
    rng = np.random.default_rng(seed + 10)
    gen_u, imp_u = rng.random(gen.size) < 0.2, rng.random(imp.size) < 0.3
    r = m.generalised_rates(gen, gen_u, imp, imp_u, threshold)
    assert r.frr == pytest.approx(np.mean(np.where(gen_u, -np.inf, gen) <= threshold))
    assert r.far == pytest.approx(np.mean(np.where(imp_u, -np.inf, imp) > threshold))
    assert r.fnmr == pytest.approx(np.mean(gen[~gen_u] <= threshold))
    assert r.fmr == pytest.approx(np.mean(imp[~imp_u] > threshold))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("gamma", "far"), [(0.0, 0.01), (0.3, 0.01), (0.5, 0.1), (0.7, 0.05)])
def test_unsure_as_reject_agrees_with_the_paper_calibration_at_that_gamma(seed: int, gamma: float, far: float) -> None:
    """At a fixed gamma the paper's calibration rule and the generalised rates give the same threshold and FRR."""
    gen, imp = _scores(seed)
    rng = np.random.default_rng(seed)
    ea, eb = rng.random(gen.size + imp.size), rng.random(gen.size + imp.size)
    sim = np.concatenate([gen, imp])
    same = np.r_[np.ones(gen.size, bool), np.zeros(imp.size, bool)]
    unsure = np.minimum(ea, eb) < gamma
    point = m.unsure_as_reject_at_far(gen, unsure[same], imp, unsure[~same], far)
    paper = calibrate_gamma_pairs(sim, ea, eb, same, far, grid=[gamma])
    assert point.threshold == paper.threshold
    assert point.reject_rate == pytest.approx(paper.frr) and point.false_accept_rate == pytest.approx(paper.far)


@pytest.mark.parametrize("far", [0.1, 0.02])
def test_sure_only_uses_the_sure_pairs_alone(far: float) -> None:
    gen, imp = _scores(4)
    gen_u, imp_u = gen < 0.4, imp < 0.0
    point = m.sure_only_at_far(gen, gen_u, imp, imp_u, far)
    t = _brute_threshold(imp[~imp_u], far)
    assert point.threshold == t and point.accept_rate == pytest.approx(np.mean(gen[~gen_u] > t))
    assert (point.n_positive, point.n_negative) == (int((~gen_u).sum()), int((~imp_u).sum()))


def test_rank1_mate_scores_hand_case() -> None:
    sim = np.array([[0.9, 0.1, 0.2],    # probe a: mate a first
                    [0.5, 0.4, 0.1],    # probe b: mate b second -> -inf
                    [0.3, 0.3, 0.3],    # probe c: tie with the top counts as first
                    [0.2, 0.7, 0.1]])   # probe z: no mate (non-mated)
    mate, top = m.rank1_mate_scores(sim, ["a", "b", "c", "z"], ["a", "b", "c"])
    np.testing.assert_array_equal(mate, [0.9, -np.inf, 0.3, -np.inf])
    np.testing.assert_array_equal(top, [0.9, 0.5, 0.3, 0.7])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fpir", [0.1, 0.02])
@pytest.mark.parametrize("reject", [False, True])
def test_fnir_at_fpir_matches_brute_force(seed: int, fpir: float, reject: bool) -> None:
    rng = np.random.default_rng(seed)
    gallery = np.array([f"id{i}" for i in range(8)])
    mated_labels = rng.choice(gallery, 80)
    probes = np.r_[mated_labels, np.array([f"out{i}" for i in range(100)])]
    sim = rng.normal(0.2, 0.15, (probes.size, gallery.size))
    sim[np.arange(80), np.searchsorted(gallery, mated_labels)] += 0.4
    q = rng.random(probes.size)
    rejected = q < 0.2 if reject else np.zeros(probes.size, bool)
    mate, top = m.rank1_mate_scores(sim, probes, gallery)
    point = m.fnir_at_fpir(mate[:80], top[80:], fpir, mated_rejected=rejected[:80], nonmated_rejected=rejected[80:])
    # brute force: the lowest threshold whose FPIR (rejected non-mated never match) is within budget
    nonmated = np.where(rejected[80:], -np.inf, top[80:])
    t = _brute_threshold(nonmated, fpir)
    hits = [(not rejected[p]) and sim[p].argmax() == np.searchsorted(gallery, probes[p]) and sim[p].max() > t
            for p in range(80)]
    assert point.threshold == t
    assert point.reject_rate == pytest.approx(1 - np.mean(hits))
    assert point.false_accept_rate == pytest.approx(np.mean(nonmated > t))
    assert point.false_accept_rate <= fpir


@pytest.mark.parametrize(("method", "expected"), [
    ("uniform", [1 / 3, 1 / 3, 1 / 3]),
    ("ers", [0.2, 0.6, 0.2]),
    ("ers2", [1 / 11, 9 / 11, 1 / 11]),
    ("softmax", list(np.exp([0.1, 0.3, 0.1]) / np.exp([0.1, 0.3, 0.1]).sum())),
    ("topk", [0.5, 0.5, 0.0]),
])
def test_pooling_weights_hand_cases(method: str, expected: list[float]) -> None:
    # ERS (0.1, 0.3, 0.1), softmax temperature 1, top-2 (the tie goes to the earlier member)
    w = m.pooling_weights([0.1, 0.3, 0.1], method, temperature=1.0, top_k=2)
    np.testing.assert_allclose(w, expected)


@pytest.mark.parametrize("method", ["ers", "ers2"])
def test_pooling_all_zero_ers_is_uniform(method: str) -> None:
    np.testing.assert_allclose(m.pooling_weights([0.0, 0.0], method, temperature=1.0, top_k=1), [0.5, 0.5])


def test_softmax_temperature_sharpens_towards_topk() -> None:
    w = m.pooling_weights([0.1, 0.9, 0.5], "softmax", temperature=1e-3, top_k=1)
    np.testing.assert_allclose(w, [0.0, 1.0, 0.0], atol=1e-12)


@pytest.mark.parametrize("method", m.POOLING_METHODS)
def test_pool_template_is_the_unit_weighted_mean(method: str) -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, 8))
    ers = rng.random(5)
    got = m.pool_template(emb, ers, method, temperature=0.2, top_k=2)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = m.pooling_weights(ers, method, temperature=0.2, top_k=2)
    expected = sum(w[i] * unit[i] for i in range(5))
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ties", [False, True])
def test_edc_curve_matches_brute_force(seed: int, ties: bool) -> None:
    gen, _ = _scores(seed, n_gen=37)
    rng = np.random.default_rng(seed)
    quality = np.round(rng.random(gen.size), 1) if ties else rng.random(gen.size)
    fractions = np.linspace(0.0, 0.5, 11)
    got = m.edc_curve(gen, quality, 0.5, fractions)
    order = np.argsort(quality, kind="stable")
    for f, value in zip(fractions, got):
        kept = gen[order[int(math.floor(f * gen.size + 1e-9)):]]
        assert value == pytest.approx(np.mean(kept <= 0.5))


def test_edc_discarding_the_failures_first_drops_fnmr_to_zero() -> None:
    gen = np.array([0.1, 0.2, 0.9, 0.8, 0.7, 0.95])
    curve = m.edc_curve(gen, quality=gen, threshold=0.5, discard_fractions=[0.0, 1 / 3, 0.5])
    np.testing.assert_allclose(curve, [2 / 6, 0.0, 0.0])


@pytest.mark.parametrize(("x", "y", "area"), [([0, 0.5], [1, 1], 0.5), ([0, 0.25, 0.5], [0.4, 0.2, 0.0], 0.1)])
def test_partial_area_hand_cases(x: list[float], y: list[float], area: float) -> None:
    assert m.partial_area(x, y) == pytest.approx(area)


def test_calibrate_gamma_split_uses_only_the_calibration_pairs() -> None:
    rng = np.random.default_rng(0)
    n = 300
    sim, ea, eb = rng.random(n), rng.random(n), rng.random(n)
    same = rng.random(n) < 0.3
    calibration = rng.random(n) < 0.5
    got = calib.calibrate_gamma_split(sim, ea, eb, same, calibration, 0.05)
    expected = calibrate_gamma_pairs(sim[calibration], ea[calibration], eb[calibration], same[calibration], 0.05)
    assert got == expected
    # the evaluation pairs do not move it
    sim2 = np.where(calibration, sim, rng.random(n))
    assert calib.calibrate_gamma_split(sim2, ea, eb, same, calibration, 0.05) == expected


def test_calibrate_gamma_split_says_when_calibration_identities_lack_impostors() -> None:
    with pytest.raises(ErsUserError, match="0 impostor pairs"):
        calib.calibrate_gamma_split([0.9, 0.1], [1, 1], [1, 1], [True, False], [True, False], 0.01)


def test_calibration_lowers_frr_when_low_ers_explains_the_failures() -> None:
    """The paper's claim in miniature: genuine failures sit on low-ERS pairs, so unsure-as-reject wins."""
    rng = np.random.default_rng(5)
    n_gen, n_imp = 400, 4000
    gen_q = rng.random(n_gen)
    gen = np.where(gen_q < 0.2, rng.normal(0.2, 0.1, n_gen), rng.normal(0.7, 0.1, n_gen))
    imp_q = rng.random(n_imp)
    imp = np.where(imp_q < 0.2, rng.normal(0.35, 0.1, n_imp), rng.normal(0.0, 0.1, n_imp))
    sim = np.r_[gen, imp]
    q = np.r_[gen_q, imp_q]
    same = np.r_[np.ones(n_gen, bool), np.zeros(n_imp, bool)]
    cal = calib.calibrate_gamma_split(sim, q, q, same, np.ones(sim.size, bool), 1e-3)
    baseline = m.verification_at_far(gen, imp, 1e-3)
    unsure = m.unsure_as_reject_at_far(gen, gen_q < cal.gamma, imp, imp_q < cal.gamma, 1e-3)
    assert cal.gamma > 0 and unsure.reject_rate < baseline.reject_rate


def test_calibration_identities_are_a_seeded_share_of_names() -> None:
    names = np.array([f"id{i}" for i in range(2000)])
    cal = calib.calibration_identities(names, 0.3, seed=4)
    assert 0.25 < cal.mean() < 0.35
    shuffled = np.random.default_rng(0).permutation(2000)
    assert (calib.calibration_identities(names[shuffled], 0.3, seed=4) == cal[shuffled]).all()  # by name, not position
    assert (calib.calibration_identities(names, 0.3, seed=5) != cal).any()


def test_calibrate_gamma_held_out_is_the_split_calibration_and_a_brute_force_check() -> None:
    rng = np.random.default_rng(3)
    identities = np.repeat([f"p{i}" for i in range(30)], 6)
    centres = rng.normal(size=(30, 16))
    emb = centres[np.repeat(np.arange(30), 6)] + 0.6 * rng.normal(size=(180, 16))
    ers = rng.uniform(0.0, 1.0, size=180)
    calibration, check = calib.calibrate_gamma_held_out(emb, identities, ers, target_far=0.05,
                                                          calibration_share=0.5, seed=1)
    i, j, same = build_identity_pairs(identities, max_pairs=200_000, seed=1)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = np.array([unit[a] @ unit[b] for a, b in zip(i, j)])
    q = np.minimum(ers[i], ers[j])
    cal_row = calib.calibration_identities(identities, 0.5, 1)
    cal, ev = cal_row[i] & cal_row[j], ~cal_row[i] & ~cal_row[j]
    expected = calibrate_gamma_pairs(sim[cal], q[cal], q[cal], same[cal], 0.05)
    assert calibration.gamma == pytest.approx(expected.gamma) and calibration.frr == pytest.approx(expected.frr)

    def frr_at_far(gen, imp):  # brute force: the lowest threshold accepting at most floor(far * n) impostors
        budget = int(np.floor(0.05 * imp.size + 1e-9))
        t = min(x for x in list(imp) + [np.inf] if np.sum(imp > x) <= budget)
        return float(np.mean(gen <= t))

    gen, imp = sim[ev & same], sim[ev & ~same]
    unsure_g, unsure_i = q[ev & same] < calibration.gamma, q[ev & ~same] < calibration.gamma
    assert check is not None and check.genuine_pairs == gen.size and check.impostor_pairs == imp.size
    assert check.frr_baseline == pytest.approx(frr_at_far(gen, imp))
    assert check.frr_unsure_as_reject == pytest.approx(
        frr_at_far(np.where(unsure_g, -np.inf, gen), np.where(unsure_i, -np.inf, imp)))
    assert check.unsure_rate_genuine == pytest.approx(unsure_g.mean())
