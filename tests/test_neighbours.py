"""Tests for ers_spark.core.linkage (local eps-links, reference single linkage), .ui_cluster (eps choice)
and .cells (capped cells)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from ers_spark.errors import ClusteringError
from ers_spark.core.cells import (
    CellPlan,
    capped_single_linkage,
    expected_cell_rows,
    group_memberships,
    plan_from_sub_centres,
    nearest_cells,
    plan_cells,
)
from ers_spark.core.clustering import spherical_kmeans
from ers_spark.core.linkage import LocalLinks, eps_spanning_links, exact_single_linkage, jaccard, links_to_labels
from ers_spark.core.ui_cluster import (
    EpsChoice,
    choose_eps,
    cluster_sizes,
    dominant_cluster,
    first_absorption,
    identity_clusters,
    separated_limit,
)
from ers_spark.core.synthetic import RECOMMENDED_EPS, vmf_embeddings


def _circle(degrees: list[float]) -> np.ndarray:
    r = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


def _dist(deg: float) -> float:
    return 1.0 - math.cos(math.radians(deg))


def _partition(ids: np.ndarray, labels: np.ndarray) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for i, lab in zip(ids.tolist(), labels.tolist()):
        groups.setdefault(lab, set()).add(i)
    return {frozenset(g) for g in groups.values()}


def _check_star(out: LocalLinks, components: list[set[int]]) -> None:
    """Exactly one link per non-minimum member, pointing at the component minimum."""
    expected = sorted((i, min(c)) for c in components for i in c if i != min(c))
    got = sorted(zip(out.src.tolist(), out.dst.tolist()))
    assert got == expected


# (name, angles in degrees, ids, eps, expected multi-member components, expected raw edges)
CASES = [
    ("chain-linked", [0, 30, 60, 90, 120], [1, 2, 3, 4, 5], _dist(30) + 1e-9, [{1, 2, 3, 4, 5}], 4),
    ("chain-just-broken", [0, 30, 60, 90, 120], [1, 2, 3, 4, 5], _dist(30) - 1e-9, [], 0),
    ("chain-with-gap", [0, 30, 60, 100, 130], [1, 2, 3, 4, 5], _dist(31), [{1, 2, 3}, {4, 5}], 3),
    ("two-blobs", [0, 2, 4, 180, 182], [10, 11, 12, 20, 21], 0.01, [{10, 11, 12}, {20, 21}], 4),
    ("singletons", [0, 90, 180, 270], [5, 6, 7, 8], 0.5, [], 0),
    ("orthogonal-at-eps-1", [0, 90], [1, 2], 1.0, [{1, 2}], 1),
    ("orthogonal-below-eps-1", [0, 90], [1, 2], 1.0 - 1e-12, [], 0),
    ("duplicates-at-eps-0", [45, 45, 90], [3, 4, 5], 0.0, [{3, 4}], 1),
    ("eps-2-links-everything", [0, 90, 180], [7, 8, 9], 2.0, [{7, 8, 9}], 3),
    ("unsorted-ids-root-is-min", [0, 1, 2, 90], [40, 7, 19, 3], 0.01, [{40, 7, 19}], 3),
]


@pytest.mark.parametrize("block_size", [1, 2, 2048])
@pytest.mark.parametrize("name,angles,ids,eps,comps,raw", CASES, ids=[c[0] for c in CASES])
def test_tiny_cases(name, angles, ids, eps, comps, raw, block_size) -> None:  # type: ignore[no-untyped-def]
    out = eps_spanning_links(np.array(ids, dtype=np.int64), _circle(angles), eps, block_size=block_size)
    assert isinstance(out, LocalLinks)
    assert out.src.dtype == np.int64 and out.dst.dtype == np.int64
    _check_star(out, comps)
    assert out.raw_edge_count == raw


def test_tiny_cases_match_exact_single_linkage() -> None:
    for _name, angles, ids, eps, comps, _raw in CASES:
        if "eps" in _name or "orthogonal" in _name:
            continue  # exact float boundaries: scipy's cosine rounds differently
        ref = exact_single_linkage(_circle(angles), eps)
        multi = {c for c in _partition(np.array(ids), ref) if len(c) > 1}
        assert multi == {frozenset(c) for c in comps}, _name


def test_empty_and_single_point() -> None:
    for n in (0, 1):
        out = eps_spanning_links(np.arange(n), np.ones((n, 4), np.float32) / 2.0, 0.5)
        assert out.src.size == 0 and out.dst.size == 0 and out.raw_edge_count == 0


def test_input_errors() -> None:
    x = _circle([0, 1])
    with pytest.raises(ValueError, match="^eps_spanning_links: ids must be unique$"):
        eps_spanning_links(np.array([1, 1]), x, 0.1)
    with pytest.raises(TypeError, match="^eps_spanning_links: ids must be a 1-D integer array, got dtype float64$"):
        eps_spanning_links(np.array([1.0, 2.0]), x, 0.1)
    with pytest.raises(ValueError, match=r"^eps_spanning_links: embeddings shape \(2, 2\) does not match 3 ids$"):
        eps_spanning_links(np.arange(3), x, 0.1)
    with pytest.raises(ValueError, match=r"^eps_spanning_links: eps must be a cosine distance in \[0, 2\], got -0.1$"):
        eps_spanning_links(np.arange(2), x, -0.1)


@pytest.mark.parametrize("eps", [0.1, 0.2, 0.3, 0.4, 0.55, 0.7])
@pytest.mark.parametrize("block_size", [37, 128, 4096])
def test_random_links_match_exact_single_linkage(eps: float, block_size: int) -> None:
    x, _ = vmf_embeddings(45, 10, dim=32, kappa=200.0, ui_kappa=60.0, ui_share=0.1, seed=11)
    assert x.shape[0] == 500
    ids = np.random.default_rng(1).choice(10**9, size=x.shape[0], replace=False).astype(np.int64)
    out = eps_spanning_links(ids, x, eps, block_size=block_size)
    ref = exact_single_linkage(x, eps)
    got = links_to_labels(ids, out.src, out.dst)
    assert _partition(ids, got) == _partition(ids, ref)
    # O(n): exactly n - (#components) links, each source once, each target its component minimum
    assert out.src.size == x.shape[0] - np.unique(ref).size
    assert np.unique(out.src).size == out.src.size
    assert np.all(out.dst < out.src)
    assert out.raw_edge_count == int(np.sum(pdist(x.astype(np.float64), "cosine") <= eps))


def test_float64_and_float32_agree_away_from_boundary() -> None:
    x, _ = vmf_embeddings(30, 5, dim=16, seed=2)
    ids = np.arange(x.shape[0], dtype=np.int64)
    a = eps_spanning_links(ids, x, 0.4, block_size=50)
    b = eps_spanning_links(ids, x.astype(np.float64), 0.4, block_size=50)
    assert _partition(ids, links_to_labels(ids, a.src, a.dst)) == _partition(
        ids, links_to_labels(ids, b.src, b.dst)
    )


def test_device_cuda_runs_or_falls_back() -> None:
    x, _ = vmf_embeddings(20, 5, dim=16, seed=4)
    ids = np.arange(x.shape[0], dtype=np.int64)
    ref = eps_spanning_links(ids, x, 0.4)
    try:
        import torch  # type: ignore[import-not-found]

        cuda = bool(torch.cuda.is_available())
    except ImportError:
        cuda = False
    if cuda:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = eps_spanning_links(ids, x, 0.4, block_size=33, device="cuda")
    else:
        with pytest.warns(UserWarning, match="using numpy"):
            got = eps_spanning_links(ids, x, 0.4, block_size=33, device="cuda")
    assert sorted(zip(got.src.tolist(), got.dst.tolist())) == sorted(zip(ref.src.tolist(), ref.dst.tolist()))


def test_links_to_labels_and_unknown_ids() -> None:
    lab = links_to_labels([5, 9, 2, 7], [9, 7], [5, 2])
    assert lab.tolist() == [5, 5, 2, 2]
    with pytest.raises(ValueError, match="^links_to_labels: links reference unknown ids$"):
        links_to_labels([1, 2], [3], [1])


def test_exact_single_linkage_small() -> None:
    assert exact_single_linkage(np.zeros((0, 3)), 0.5).size == 0
    assert exact_single_linkage([[1.0, 0.0]], 0.5).tolist() == [1]
    lab = exact_single_linkage(_circle([0, 10, 90, 95]), _dist(11))
    assert lab[0] == lab[1] and lab[2] == lab[3] and lab[0] != lab[2]


def test_cluster_sizes() -> None:
    assert cluster_sizes([4, 4, 1, 4, 9, 1]).tolist() == [3, 2, 1]
    assert cluster_sizes([]).tolist() == []


@pytest.mark.parametrize(
    "labels,ratio,min_share,expected",
    [
        ([7, 7, 7, 7, 2, 5], 2.0, 0.5, 7),
        ([1, 1, 1, 1, 1, 1, 2, 2, 2], 2.0, 0.5, 1),
        (["x", "x"], 3.0, 0.5, "x"),  # no second cluster, largest has 2 members
    ],
)
def test_dominant_cluster_found(labels, ratio, min_share, expected) -> None:  # type: ignore[no-untyped-def]
    assert dominant_cluster(labels, ratio, min_share) == expected


@pytest.mark.parametrize(
    "labels,ratio,min_share,sizes",
    [
        ([1, 1, 2, 2, 3], 2.0, 0.1, "[2, 2, 1]"),  # tie
        ([1], 2.0, 0.1, "[1]"),  # lone singleton is not dominant
        ([1, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9], 2.0, 0.5, "[4, 1, 1, 1, 1]"),  # share too small
    ],
)
def test_dominant_cluster_errors(labels, ratio, min_share, sizes) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ClusteringError) as exc:
        dominant_cluster(labels, ratio, min_share)
    msg = str(exc.value)
    assert msg.startswith(f"no dominant cluster: top sizes {sizes} of {len(labels)} rows")
    assert "\n" not in msg


GRID = [0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7]


def test_choose_eps_takes_the_largest_eps_before_identities_merge() -> None:
    """Planted UI: the chosen eps gathers the whole UI, pure, and is the last eps before identity clusters vanish."""
    x, y = vmf_embeddings(60, 5, dim=128, ui_share=0.1, seed=5)
    choice = choose_eps(x, GRID, ratio=3.0, min_share=0.05, identity_min_size=3, identity_tolerance=0.1)
    assert isinstance(choice, EpsChoice)
    dom = dominant_cluster(choice.labels, 3.0, 0.05)
    members = np.flatnonzero(choice.labels == dom)
    ui = np.flatnonzero(y == -1)
    assert set(members.tolist()) == set(ui.tolist())
    assert [e for e, _, _ in choice.size_table] == GRID
    table = {e: (sizes, n) for e, sizes, n in choice.size_table}
    assert choice.eps == 0.6 and table[0.7][0][1] == 20  # at 0.7 identities merge (a second cluster of 4 identities)
    # independent: the table at the chosen eps equals the exact clustering's sizes
    assert table[choice.eps][0] == cluster_sizes(exact_single_linkage(x, choice.eps))[:5].tolist()
    assert choice.eps >= RECOMMENDED_EPS  # the old rule's smallest dominant eps (0.3) held a partial UI
    assert choice.rule == "largest eps before identities merge"


def test_choose_eps_without_identity_clusters_stops_before_an_absorption() -> None:
    """One image per person: identities cannot be seen merging, so the limit is the first absorption of a
    cluster of identity size; here there is none, and the whole planted UI is taken, pure."""
    x, y = vmf_embeddings(200, 1, dim=128, ui_share=0.2, seed=2)
    choice = choose_eps(x, GRID, ratio=3.0, min_share=0.05, identity_min_size=3, identity_tolerance=0.1)
    assert choice.rule == "largest eps before the largest cluster absorbs an identity-sized one"
    members = np.flatnonzero(choice.labels == dominant_cluster(choice.labels, 3.0, 0.05))
    assert set(members.tolist()) == set(np.flatnonzero(y == -1).tolist()) and choice.eps == 0.7


@pytest.mark.parametrize(
    "labels,min_size,expected",
    [
        ([[1, 1, 1, 2, 2, 2, 3], [1, 1, 1, 1, 1, 1, 3]], 3, 1),  # the core takes a 3-cluster
        ([[1, 1, 1, 2, 2, 2, 3], [1, 1, 1, 1, 1, 1, 3]], 4, None),  # ... which is below the identity size
        ([[1, 1, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1, 4, 5], [1, 1, 1, 1, 1, 1, 1]], 2, None),  # singletons only
        ([[1, 2, 3, 4], [1, 1, 3, 3], [1, 1, 1, 1]], 2, 2),  # two pairs merge at the second step
    ],
)
def test_first_absorption(labels, min_size, expected) -> None:  # type: ignore[no-untyped-def]
    assert first_absorption([np.array(lab) for lab in labels], min_size) == expected


def test_choose_eps_error_lists_table() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 64))  # no structure: everything a singleton at small eps
    with pytest.raises(ClusteringError) as exc:
        choose_eps(x, [0.05, 0.1], ratio=2.0, min_share=0.2, identity_min_size=3, identity_tolerance=0.1)
    msg = str(exc.value)
    assert msg.startswith("no UI here: the largest cluster absorbs no identity-sized cluster up to eps=0.1 and no "
                          "cluster up to there has largest >= 2 x second and >= 0.2 of 60 rows")
    assert "eps=0.05: [1, 1, 1, 1, 1] (0 identity-sized)" in msg and "eps=0.1: [1, 1, 1, 1, 1]" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "counts,tolerance,expected",
    [
        ([0, 20, 46, 45, 43, 42, 40, 37, 27], 0.1, 5),  # ORL + degraded copies (dlib), 0.01 grid
        ([0, 20, 46, 45, 43, 42, 40, 37, 27], 0.2, 7),
        ([0, 20, 46, 45, 43, 42, 40, 37, 27], 0.0, 2),  # the peak itself
        ([5, 5, 5], 0.1, 2),  # flat: the last eps
        ([9, 3, 9], 0.1, 0),  # stops at the first drop, even if the count recovers
        ([0, 0], 0.1, 1),
    ],
)
def test_separated_limit(counts, tolerance, expected) -> None:  # type: ignore[no-untyped-def]
    assert separated_limit(counts, tolerance) == expected


@pytest.mark.parametrize("sizes,min_size,expected", [([40, 10, 9, 3, 1], 5, 2), ([40], 5, 0), ([10, 10, 10], 10, 2)])
def test_identity_clusters_excludes_the_largest(sizes, min_size, expected) -> None:  # type: ignore[no-untyped-def]
    assert identity_clusters(np.array(sizes), min_size) == expected


@pytest.mark.parametrize(
    "a,b,expected",
    [([1, 2, 3], [2, 3, 4], 0.5), ([], [], 1.0), ([1, 1, 2], [2], 0.5), ([1], [2], 0.0)],
)
def test_jaccard(a, b, expected) -> None:  # type: ignore[no-untyped-def]
    assert jaccard(a, b) == expected


@pytest.mark.parametrize("block_size", [16, 40, 100])
def test_dense_blob_path_matches_exact(block_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import ers_spark.core.linkage as nb

    calls = {"n": 0}
    real_group = nb._group

    def counting_group(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real_group(*args, **kwargs)

    monkeypatch.setattr(nb, "_group", counting_group)
    rng = np.random.default_rng(8)
    from ers_spark.core.synthetic import sample_vmf

    mu = np.zeros(16)
    mu[0] = 1.0
    blob = sample_vmf(np.repeat(mu[None], 400, axis=0), 40.0, rng)  # dense, but chained at eps 0.3
    others = rng.normal(size=(100, 16)).astype(np.float32)
    x = np.vstack([blob, others / np.linalg.norm(others, axis=1, keepdims=True)])
    x = x[rng.permutation(x.shape[0])]
    ids = rng.choice(10**6, size=x.shape[0], replace=False).astype(np.int64)
    out = eps_spanning_links(ids, x, 0.3, block_size=block_size)
    ref = exact_single_linkage(x, 0.3)
    if block_size >= 40:  # tiles of 16 x 16 can never exceed the dense threshold 8 * (16 + 16)
        assert calls["n"] > 0  # the OR-collapse branch ran
    assert _partition(ids, links_to_labels(ids, out.src, out.dst)) == _partition(ids, ref)
    assert out.src.size == x.shape[0] - np.unique(ref).size
    assert out.raw_edge_count == int(np.sum(pdist(x.astype(np.float64), "cosine") <= 0.3))


def test_many_duplicate_edges_between_two_components() -> None:
    # 256 identical points split 128 / 128 across two blocks: 16,384 duplicate
    # component-level edges must still count as a link (no small-int overflow)
    x = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (256, 1))
    ids = np.arange(256, dtype=np.int64)
    out = eps_spanning_links(ids, x, 0.01, block_size=128)
    assert sorted(out.src.tolist()) == list(range(1, 256))
    assert set(out.dst.tolist()) == {0}
    assert out.raw_edge_count == 256 * 255 // 2


# ----------------------------------------------------------------------------- capped cells


@pytest.mark.parametrize(
    "cells,cut,expected_rows,expected_groups",
    [
        ([[0], [1], [2]], {}, [0, 1, 2], [0, 1, 2]),  # nothing cut: the cell is the group
        ([[0, 1], [1, 0]], {}, [0, 0, 1, 1], [0, 1, 1, 0]),  # nprobe 2: a row joins both cells
        ([[1], [0]], {1: 2}, [0, 1], [2, 0]),  # cut cell 1: its row goes to group offset + nearest sub-cell
        ([[0], [1]], {1: 2}, [0, 1], [0, 3]),
        ([[1, 0]], {1: 2}, [0, 0], [0, 2]),  # a row in an uncut and a cut cell joins one group of each
    ],
)
def test_group_memberships(cells, cut, expected_rows, expected_groups) -> None:  # type: ignore[no-untyped-def]
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)[: len(cells)]
    subs = {c: np.eye(2, dtype=np.float32) for c in cut}
    plan = CellPlan(n_cells=3, sub_centres=subs, offsets=cut)
    rows, groups = group_memberships(x, np.array(cells), plan, nprobe=1)
    assert sorted(zip(rows.tolist(), groups.tolist())) == sorted(zip(expected_rows, expected_groups))


def test_plan_cells_cuts_only_the_cells_above_the_cap() -> None:
    x, _ = vmf_embeddings(n_identities=50, per_identity=10, ui_share=0.2, seed=2)
    centres = spherical_kmeans(x, 4, seed=0)
    near = nearest_cells(x, centres, 2)
    expected = expected_cell_rows(near, 4, n_rows=x.shape[0])
    assert expected.sum() == pytest.approx(2 * x.shape[0])
    plan = plan_cells(x, near, expected, max_cell_rows=int(np.median(expected)), nprobe=2, seed=0)
    big = np.flatnonzero(expected > np.median(expected))
    assert sorted(plan.sub_centres) == big.tolist()
    for c in big:  # about the cap per sub-cell: ceil(nprobe * expected / cap) sub-centres
        assert plan.sub_centres[c].shape[0] == int(np.ceil(2 * expected[c] / int(np.median(expected))))
        assert np.allclose(np.linalg.norm(plan.sub_centres[c], axis=1), 1.0, atol=1e-5)


def _largest(labels: np.ndarray) -> np.ndarray:
    return np.flatnonzero(labels == np.bincount(labels).argmax())


@pytest.mark.parametrize("eps", [RECOMMENDED_EPS, 0.3])
@pytest.mark.parametrize(
    "case,cells,cap",
    [
        ("ui_split_across_many_cells", 32, 400),
        ("ui_inside_one_oversized_cell", 4, 400),
        ("everything_in_one_cut_cell", 1, 400),
    ],
)
def test_capped_single_linkage_matches_exact_single_linkage(case: str, cells: int, cap: int, eps: float) -> None:
    """The UI found with capped, sub-quantised cells is the exact single-linkage UI (Jaccard >= 0.99)."""
    x, y = vmf_embeddings(n_identities=400, per_identity=10, ui_share=0.2, seed=1)
    ids = np.arange(x.shape[0], dtype=np.int64)
    exact = eps_spanning_links(ids, x, eps)
    exact_ui = _largest(links_to_labels(ids, exact.src, exact.dst))
    centres = spherical_kmeans(x, cells, seed=0)
    near = nearest_cells(x, centres, 2)
    ui_cells = np.unique(near[y < 0])
    expected = expected_cell_rows(near, cells, x.shape[0])
    if case == "ui_inside_one_oversized_cell":  # the coarse quantiser put the whole UI in one cell
        assert np.bincount(near[y < 0][:, 0]).max() == np.count_nonzero(y < 0)
    assert (expected[ui_cells] > cap).any(), "the UI's cells must be cut for this case to test anything"
    capped = capped_single_linkage(ids, x, eps, centres, nprobe=2, max_cell_rows=cap)
    assert jaccard(_largest(capped), exact_ui) >= 0.99
    assert jaccard(exact_ui, np.flatnonzero(y < 0)) >= 0.99  # the planted UI is what exact linkage finds


def test_capped_single_linkage_is_exact_when_nothing_is_cut() -> None:
    x, _ = vmf_embeddings(n_identities=60, per_identity=10, ui_share=0.1, seed=4)
    ids = np.arange(x.shape[0], dtype=np.int64) * 3 + 7
    centres = spherical_kmeans(x, 3, seed=0)
    capped = capped_single_linkage(ids, x, 0.3, centres, nprobe=3, max_cell_rows=10 * x.shape[0])
    exact = exact_single_linkage(x, 0.3)
    same = {frozenset(np.flatnonzero(exact == c).tolist()) for c in np.unique(exact)}
    got = {frozenset(np.flatnonzero(capped == c).tolist()) for c in np.unique(capped)}
    assert got == same


def _brute_force_groups(x: np.ndarray, centres: np.ndarray, plan: CellPlan, nprobe: int) -> set[tuple[int, int]]:
    """Every (row, group) by full sorts of all inner products: the definition group_memberships must meet."""
    out = set()
    for i, row in enumerate(x):
        cells = np.argsort(-(centres @ row), kind="stable")[:nprobe].tolist()
        if all(c in plan.sub_centres for c in cells):  # all cut: the nprobe nearest sub-cells of them together
            leaves = [(float(s @ row), plan.offsets[c] + j) for c in cells for j, s in enumerate(plan.sub_centres[c])]
            out |= {(i, g) for _, g in sorted(leaves, key=lambda t: -t[0])[:nprobe]}
            continue
        for c in cells:
            if c not in plan.sub_centres:
                out.add((i, c))
                continue
            subs = plan.sub_centres[c]
            out |= {(i, plan.offsets[c] + j) for j in np.argsort(-(subs @ row), kind="stable")[:nprobe].tolist()}
    return out


@pytest.mark.parametrize("n_cut", [0, 3, 11, 12])
@pytest.mark.parametrize("nprobe", [1, 2, 3])
def test_group_memberships_equal_brute_force(n_cut: int, nprobe: int) -> None:
    """Some, almost all and all cells cut (all, at 1e9 rows), cells with fewer sub-cells than nprobe: the same
    groups as full sorts give, and a row whose cells are all cut joins nprobe groups."""
    rng = np.random.default_rng(n_cut * 10 + nprobe)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    x, centres = unit(rng.normal(size=(500, 16))), unit(rng.normal(size=(12, 16)))
    subs = {c: unit(rng.normal(size=(int(rng.integers(1, 9)), 16))) for c in range(n_cut)}
    plan = plan_from_sub_centres(12, subs)
    rows, groups = group_memberships(x, nearest_cells(x, centres, nprobe), plan, nprobe)
    got = list(zip(rows.tolist(), groups.tolist()))
    assert len(got) == len(set(got)) and set(got) == _brute_force_groups(x, centres, plan, nprobe)
    if n_cut == 12:
        assert np.array_equal(np.bincount(rows, minlength=x.shape[0]), np.full(x.shape[0], nprobe))


def test_plan_from_sub_centres_numbers_groups_after_the_cells() -> None:
    plan = plan_from_sub_centres(5, {3: np.eye(2, dtype=np.float32), 1: np.eye(3, dtype=np.float32)})
    assert plan.offsets == {1: 5, 3: 8} and plan.groups == 5 - 2 + 5 and list(plan.sub_centres) == [1, 3]
