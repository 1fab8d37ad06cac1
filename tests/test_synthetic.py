"""Tests for ers_spark.core.synthetic (vMF embeddings and image degradations)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import ive

from ers_spark.core.linkage import exact_single_linkage
from ers_spark.core.ui_cluster import cluster_sizes
from ers_spark.core.synthetic import (
    DEFAULT_KAPPA,
    DEFAULT_UI_KAPPA,
    DEGRADATIONS,
    RECOMMENDED_EPS,
    degrade,
    degrade_random,
    iter_vmf_chunks,
    sample_vmf,
    vmf_embeddings,
    vmf_layout,
)

# --------------------------------------------------------------------------- vMF


@pytest.mark.parametrize("dim,kappa", [(3, 5.0), (16, 50.0), (128, DEFAULT_KAPPA), (128, DEFAULT_UI_KAPPA)])
def test_sample_vmf_mean_cosine_matches_theory(dim: int, kappa: float) -> None:
    # E[<x, mu>] = A_p(kappa) = I_{p/2}(kappa) / I_{p/2-1}(kappa)  (Mardia & Jupp)
    expected = ive(dim / 2.0, kappa) / ive(dim / 2.0 - 1.0, kappa)
    rng = np.random.default_rng(0)
    mu = rng.normal(size=dim)
    mu /= np.linalg.norm(mu)
    x = sample_vmf(np.repeat(mu[None], 20_000, axis=0), kappa, rng)
    assert x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    cos = x.astype(np.float64) @ mu
    assert cos.mean() == pytest.approx(expected, abs=4 * cos.std() / np.sqrt(cos.size) + 1e-4)


def test_sample_vmf_directions_are_isotropic_around_mu() -> None:
    rng = np.random.default_rng(1)
    mu = np.zeros(8)
    mu[0] = 1.0
    x = sample_vmf(np.repeat(mu[None], 20_000, axis=0), 30.0, rng).astype(np.float64)
    # tangent components have zero mean and equal variance
    tang = x[:, 1:]
    assert np.all(np.abs(tang.mean(axis=0)) < 0.01)
    var = tang.var(axis=0)
    assert var.max() / var.min() < 1.1


def test_sample_vmf_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"^sample_vmf: mus must have shape \(m, d\) with d >= 2, got \(3,\)$"):
        sample_vmf(np.ones(3), 1.0, rng)
    with pytest.raises(ValueError, match="^sample_vmf: kappa must be > 0, got 0.0$"):
        sample_vmf(np.ones((1, 3)), 0.0, rng)


def test_layout_counts_and_shuffle() -> None:
    lab = vmf_layout(30, 4, ui_share=0.25, seed=3)
    assert lab.size == 160  # 120 identity rows + 40 UI rows (25 % of 160)
    assert (lab == -1).sum() == 40
    np.testing.assert_array_equal(np.bincount(lab[lab >= 0]), np.full(30, 4))
    assert not np.all(np.diff(lab[lab >= 0]) >= 0)  # shuffled


def test_vmf_embeddings_shapes_determinism_and_seeds() -> None:
    x, y = vmf_embeddings(20, 5, dim=32, seed=1)
    x2, y2 = vmf_embeddings(20, 5, dim=32, seed=1)
    x3, _ = vmf_embeddings(20, 5, dim=32, seed=2)
    assert x.shape == (111, 32) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x, x3)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 7, 100, 8192, 20_000])
def test_chunks_concatenate_to_the_same_data(chunk_rows: int) -> None:
    # 10,000 + 1,111 rows span two internal generation blocks
    full_x, full_y = vmf_embeddings(1000, 10, dim=8, seed=9)
    if chunk_rows == 1:
        full_x, full_y = full_x[:300], full_y[:300]
        it = iter_vmf_chunks(1000, 10, dim=8, seed=9, chunk_rows=1)
        parts = [next(it) for _ in range(300)]
    else:
        parts = list(iter_vmf_chunks(1000, 10, dim=8, seed=9, chunk_rows=chunk_rows))
        assert all(p[0].shape[0] == chunk_rows for p in parts[:-1])
        assert 0 < parts[-1][0].shape[0] <= chunk_rows
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), full_x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), full_y)


def test_cluster_geometry_matches_documented_eps() -> None:
    x, y = vmf_embeddings(80, 6, seed=7)
    ui = y == -1
    # at the recommended eps: UI is one cluster, every identity is one pure cluster
    lab = exact_single_linkage(x, RECOMMENDED_EPS)
    assert np.unique(lab[ui]).size == 1
    for k in range(80):
        assert np.unique(lab[y == k]).size == 1
    pairs = np.unique(np.stack([lab, y], axis=1), axis=0)
    assert pairs.shape[0] == np.unique(lab).size  # each cluster holds one label
    assert cluster_sizes(lab)[0] == ui.sum()
    # well below it the UI is fragmented
    lab_small = exact_single_linkage(x, 0.2)
    assert np.unique(lab_small[ui]).size > ui.sum() // 2


def test_identity_vs_ui_spread() -> None:
    x, y = vmf_embeddings(10, 30, seed=0)
    xd = x.astype(np.float64)

    def mean_cos_to_centre(rows: np.ndarray) -> float:
        c = rows.sum(axis=0)
        return float(np.mean(rows @ (c / np.linalg.norm(c))))

    id_cos = np.mean([mean_cos_to_centre(xd[y == k]) for k in range(10)])
    ui_cos = mean_cos_to_centre(xd[y == -1])
    assert id_cos > 0.9 and 0.75 < ui_cos < 0.87  # UI is more diffuse


def test_vmf_parameter_errors() -> None:
    with pytest.raises(ValueError, match=r"^vmf: ui_share must be in \[0, 1\), got 1.0$"):
        vmf_embeddings(3, 2, ui_share=1.0)
    with pytest.raises(ValueError, match="^vmf: need n_identities >= 0 and per_identity >= 1, got 3 and 0$"):
        vmf_embeddings(3, 0)
    with pytest.raises(ValueError, match="^iter_vmf_chunks: chunk_rows must be >= 1, got 0$"):
        next(iter_vmf_chunks(3, 2, chunk_rows=0))


# --------------------------------------------------------------------------- degradations


def _face_like(shape: tuple[int, ...]) -> np.ndarray:
    """Isotropic fine texture on a gradient, values in [20, 235] (no zeros)."""
    rng = np.random.default_rng(123)
    tex = ndimage.gaussian_filter(rng.normal(size=shape[:2]), 1.2)
    tex = (tex - tex.mean()) / tex.std()
    h, w = shape[:2]
    base = 128 + 45 * tex + 30 * (np.mgrid[0:h, 0:w][1] / w - 0.5)
    img = base if len(shape) == 2 else np.stack([base, base * 0.9 + 10, base * 0.8 + 20], axis=2)
    return np.clip(img, 20, 235).astype(np.uint8)


def _detail(img: np.ndarray) -> float:
    g = img.astype(np.float64)
    if g.ndim == 3:
        g = g.mean(axis=2)
    return float(np.mean(np.hypot(ndimage.sobel(g, 0), ndimage.sobel(g, 1))))


@pytest.mark.parametrize("shape", [(112, 96), (112, 112, 3)])
@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_degrade_shape_dtype_and_effect(kind: str, shape: tuple[int, ...]) -> None:
    img = _face_like(shape)
    out = degrade(img, kind, np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.shares_memory(out, img)
    if kind in ("blur", "lowres", "motion"):
        assert _detail(out) < 0.35 * _detail(img)
    elif kind == "dark":
        assert out.astype(float).mean() < 0.13 * img.astype(float).mean()
    elif kind == "occlusion":
        assert np.mean(out.reshape(-1) == 0) >= 0.25 - 1e-9
        untouched = out != 0
        np.testing.assert_array_equal(out[untouched], img[untouched])
    elif kind == "noise":
        assert np.sqrt(np.mean((out.astype(float) - img.astype(float)) ** 2)) > 40


def test_degrade_is_deterministic_for_a_seed() -> None:
    img = _face_like((64, 64, 3))
    for kind in DEGRADATIONS:
        a = degrade(img, kind, np.random.default_rng(5))
        b = degrade(img, kind, np.random.default_rng(5))
        np.testing.assert_array_equal(a, b)


def test_degrade_random() -> None:
    img = _face_like((48, 40))
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(60):
        out, kind = degrade_random(img, rng)
        assert kind in DEGRADATIONS and out.shape == img.shape and out.dtype == np.uint8
        kinds.add(kind)
    assert kinds == set(DEGRADATIONS)


def test_degrade_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="^degrade: image must be uint8, got dtype float64$"):
        degrade(np.zeros((8, 8)), "blur", rng)
    with pytest.raises(ValueError, match=r"^degrade: image must be HxW or HxWx3, got shape \(8, 8, 4\)$"):
        degrade(np.zeros((8, 8, 4), np.uint8), "blur", rng)
    with pytest.raises(ValueError, match="^degrade: unknown kind 'sepia'; expected one of blur, lowres"):
        degrade(np.zeros((8, 8), np.uint8), "sepia", rng)
