"""Local building blocks of distributed approximate single-linkage clustering.

Single linkage at threshold ``eps`` = connected components of the graph whose
edges join embeddings at cosine distance ``<= eps`` (``d = 1 - cos``, scipy's
``'cosine'`` metric; for unit rows this is ``cos >= 1 - eps``).

The distributed job runs :func:`eps_spanning_links` inside each partition (or
bucket): it finds all eps-edges with blocked matrix products and compresses
them on the fly into a spanning forest of star shape, ``point -> local root``,
so only ``O(n)`` links leave the partition however dense the graph is. A
global connected-components pass over those links gives the clusters.

:func:`exact_single_linkage` is the scipy reference; :func:`choose_eps`,
:func:`dominant_cluster` and :func:`cluster_sizes` pick the UI cluster on a
driver-side sample.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import numpy.typing as npt
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ers_spark.errors import ClusteringError

__all__ = [
    "LocalLinks",
    "EpsChoice",
    "eps_spanning_links",
    "exact_single_linkage",
    "links_to_labels",
    "cluster_sizes",
    "dominant_cluster",
    "choose_eps",
    "identity_clusters",
    "separated_limit",
    "first_absorption",
    "jaccard",
    "CellPlan",
    "plan_cells",
    "group_memberships",
    "expected_cell_rows",
    "nearest_cells",
    "spherical_kmeans",
    "capped_single_linkage",
]

IntArray = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LocalLinks:
    """Star-shaped spanning forest of one partition's eps-graph.

    ``src[i] -> dst[i]`` links a non-root point to the smallest id of its local
    component; ``raw_edge_count`` is the number of unordered eps-pairs seen
    (self-pairs excluded), for statistics.
    """

    src: IntArray
    dst: IntArray
    raw_edge_count: int


@dataclass(frozen=True)
class EpsChoice:
    """Outcome of :func:`choose_eps`: eps, labels at that eps, and per grid eps the top-5 sizes
    and the number of identity-sized clusters outside the largest."""

    eps: float
    labels: IntArray
    size_table: list[tuple[float, list[int], int]]
    rule: str


def _star_forest(n: int, src: IntArray, dst: IntArray) -> tuple[IntArray, IntArray]:
    """Star forest (node -> smallest node of its component) of a graph on ``0..n-1``."""
    g = coo_matrix((np.ones(src.size, dtype=bool), (src, dst)), shape=(n, n))
    _, lab = connected_components(g, directed=True, connection="weak")
    comp_min = np.full(int(lab.max()) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(comp_min, lab, np.arange(n, dtype=np.int64))
    tgt = comp_min[lab]
    nonroot = np.flatnonzero(tgt != np.arange(n))
    return nonroot.astype(np.int64), tgt[nonroot]


def _tile_pairs(n: int, block: int) -> Iterator[tuple[int, int, int, int]]:
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        for c0 in range(r0, n, block):
            yield r0, r1, c0, min(n, c0 + block)


_MIN_GROUP = 8


def _group(
    hit: npt.NDArray[np.bool_], labels: IntArray, axis: int
) -> tuple[npt.NDArray[np.bool_], IntArray]:
    """OR together the rows (axis 0) or columns (axis 1) of ``hit`` that share a label.

    Returns the reduced matrix and the label of each remaining row/column.
    Only groups of at least ``_MIN_GROUP`` lines are collapsed (``reduceat``
    costs per group); smaller groups stay as they are, which is still correct.
    """
    uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    multi = counts[inv] >= _MIN_GROUP
    if not multi.any():
        return hit, labels
    single = np.flatnonzero(~multi)
    m_idx = np.flatnonzero(multi)
    m_idx = m_idx[np.argsort(inv[m_idx], kind="stable")]
    starts = np.flatnonzero(np.r_[True, np.diff(inv[m_idx]) != 0])
    reduced = np.logical_or.reduceat(np.take(hit, m_idx, axis=axis), starts, axis=axis)
    out = np.concatenate([np.take(hit, single, axis=axis), reduced], axis=axis)
    return out, np.concatenate([labels[single], labels[m_idx[starts]]])


class _Components:
    """Flat union-find over ``0..n-1``: ``comp[i]`` is always the smallest index of i's component.

    Kept flat (no trees), so a lookup is one gather; a merge relabels in O(n),
    vectorised, which is small next to one ``block_size^2 x d`` tile product.
    """

    def __init__(self, n: int) -> None:
        self.comp: IntArray = np.arange(n, dtype=np.int64)

    def merge(self, a: IntArray, b: IntArray) -> None:
        """Merge the components whose roots are ``a[i]`` and ``b[i]``."""
        nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
        k = a.size
        g = coo_matrix((np.ones(k, dtype=bool), (inv[:k], inv[k:])), shape=(nodes.size, nodes.size))
        _, lab = connected_components(g, directed=True, connection="weak")
        new_root = np.full(int(lab.max()) + 1, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(new_root, lab, nodes)
        remap = np.arange(self.comp.size, dtype=np.int64)
        remap[nodes] = new_root[lab]
        self.comp = remap[self.comp]


def _torch_backend(device: str | None) -> Any:
    if device is None or not str(device).startswith("cuda"):
        return None
    try:
        import torch  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        warnings.warn(f"device={device!r} requested but torch is not installed; using numpy", stacklevel=3)
        return None
    if not torch.cuda.is_available():
        warnings.warn(f"device={device!r} requested but CUDA is not available; using numpy", stacklevel=3)
        return None
    return torch


def eps_spanning_links(
    ids: npt.ArrayLike,
    embeddings: npt.ArrayLike,
    eps: float,
    block_size: int = 2048,
    device: str | None = None,
) -> LocalLinks:
    """All-pairs eps-graph of one partition, compressed to ``point -> local root`` links.

    Pairs at cosine distance ``<= eps`` (``cos >= 1 - eps``) are found tile by
    tile (``block_size x block_size`` products over the upper triangle, so
    memory is ``O(block_size^2 + n d)``, never ``n x n``). Components are
    merged on the fly: a flat array holds each point's current root; in each
    tile, edges inside a component are dropped (in dense tiles, rows and
    columns already in one component are first OR-collapsed) before scipy's
    connected components merges the rest, so dense tiles (the UI cluster) cost
    little beyond the product.
    The output has one link per non-root member of each local component
    (``<= n - 1`` links), root = smallest id; singletons emit nothing.

    Rows must already be L2-normalised (the caller normalises once). Products
    run in the input precision (float32 or float64); pairs within float
    rounding (~1e-6) of ``eps`` may go either way. With ``device="cuda..."``
    and torch + CUDA available the products run on the GPU.

    Examples
    --------
    >>> e = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], dtype=np.float32)
    >>> out = eps_spanning_links(np.array([10, 11, 12, 13]), e, eps=0.25)
    >>> out.src.tolist(), out.dst.tolist(), out.raw_edge_count
    ([11], [10], 1)
    """
    id_arr, emb = _checked_link_inputs(ids, embeddings, eps, block_size)
    n = id_arr.shape[0]
    empty = np.zeros(0, dtype=np.int64)
    if n < 2:
        return LocalLinks(empty, empty.copy(), 0)

    order = np.argsort(id_arr, kind="stable")
    sid = id_arr[order]
    if np.any(sid[1:] == sid[:-1]):
        raise ValueError("eps_spanning_links: ids must be unique")
    dtype = np.float64 if emb.dtype == np.float64 else np.float32
    x: npt.NDArray[np.floating[Any]] = np.ascontiguousarray(emb[order], dtype=dtype)
    thr = 1.0 - float(eps)
    torch = _torch_backend(device)
    xt = torch.as_tensor(x, device=device) if torch is not None else None

    comps = _Components(n)
    raw = 0
    for r0, r1, c0, c1 in _tile_pairs(n, block_size):
        hit = _tile_hits(x, xt, torch, thr, (r0, r1, c0, c1))
        if hit is None:
            continue
        cnt = int(np.count_nonzero(hit))
        raw += cnt
        a, b = _tile_component_edges(hit, cnt, comps.comp[r0:r1], comps.comp[c0:c1])
        keep = a != b  # edges inside a component add nothing
        if keep.any():
            comps.merge(a[keep], b[keep])

    roots = comps.comp
    nonroot = np.flatnonzero(roots != np.arange(n))
    return LocalLinks(sid[nonroot], sid[roots[nonroot]], raw)


def _checked_link_inputs(ids: npt.ArrayLike, embeddings: npt.ArrayLike, eps: float,
                         block_size: int) -> tuple[IntArray, npt.NDArray[Any]]:
    """ids as int64 and the embeddings array, or the one-line error naming what is wrong."""
    id_arr = np.asarray(ids)
    if id_arr.ndim != 1 or not np.issubdtype(id_arr.dtype, np.integer):
        raise TypeError(f"eps_spanning_links: ids must be a 1-D integer array, got dtype {id_arr.dtype}")
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] != id_arr.shape[0]:
        raise ValueError(
            f"eps_spanning_links: embeddings shape {emb.shape} does not match {id_arr.shape[0]} ids"
        )
    if not np.issubdtype(emb.dtype, np.floating):
        raise TypeError(f"eps_spanning_links: embeddings must be float32 or float64, got dtype {emb.dtype}")
    if not 0.0 <= eps <= 2.0:
        raise ValueError(f"eps_spanning_links: eps must be a cosine distance in [0, 2], got {eps}")
    if block_size < 1:
        raise ValueError(f"eps_spanning_links: block_size must be >= 1, got {block_size}")
    return id_arr.astype(np.int64), emb


def _tile_hits(x: npt.NDArray[Any], xt: Any, torch: Any, thr: float,
               tile: tuple[int, int, int, int]) -> npt.NDArray[np.bool_] | None:
    """Pairs at cosine >= thr in one tile (strict upper triangle on the diagonal); None when there are none."""
    r0, r1, c0, c1 = tile
    if xt is not None:
        hit_t = (xt[r0:r1] @ xt[c0:c1].T) >= thr
        if c0 == r0:  # strict upper triangle, built from comparisons (works for bool on any torch)
            ar = torch.arange(r1 - r0, device=hit_t.device)
            hit_t = hit_t & (ar[None, :] > ar[:, None])
        return hit_t.cpu().numpy() if bool(hit_t.any().item()) else None
    hit = (x[r0:r1] @ x[c0:c1].T) >= thr
    if c0 == r0:
        hit = np.triu(hit, k=1)
    return hit if hit.any() else None


def _tile_component_edges(hit: npt.NDArray[np.bool_], cnt: int, rows: IntArray,
                          cols: IntArray) -> tuple[IntArray, IntArray]:
    """Edges of one tile between the components of its rows and columns.

    A dense tile (the UI) is first OR-collapsed over rows and columns already in one component.
    """
    if cnt <= 8 * (rows.size + cols.size):
        rr, cc = np.nonzero(hit)
        return rows[rr], cols[cc]
    h, gr = _group(hit, rows, axis=0)
    h, gc = _group(h, cols, axis=1)
    gi, gj = np.nonzero(h)
    return gr[gi], gc[gj]


def links_to_labels(ids: npt.ArrayLike, src: npt.ArrayLike, dst: npt.ArrayLike) -> IntArray:
    """Component label (smallest member id) of each id given links between ids.

    Driver-side helper and test oracle for the global connected-components step.
    """
    id_arr = np.asarray(ids, dtype=np.int64)
    s = np.asarray(src, dtype=np.int64)
    d = np.asarray(dst, dtype=np.int64)
    order = np.argsort(id_arr, kind="stable")
    sid = id_arr[order]
    si = np.searchsorted(sid, s)
    di = np.searchsorted(sid, d)
    if s.size and (np.any(si >= sid.size) or np.any(sid[np.minimum(si, sid.size - 1)] != s)
                   or np.any(di >= sid.size) or np.any(sid[np.minimum(di, sid.size - 1)] != d)):
        raise ValueError("links_to_labels: links reference unknown ids")
    m = sid.size
    nonroot, root = _star_forest(m, si, di)
    roots = np.arange(m, dtype=np.int64)
    roots[nonroot] = root
    lab_sorted = sid[roots]
    out = np.empty_like(lab_sorted)
    out[order] = lab_sorted
    return out


def exact_single_linkage(embeddings: npt.ArrayLike, eps: float) -> IntArray:
    """Reference labels: scipy single linkage (cosine metric) cut at distance ``eps``.

    Labels are scipy's ``fcluster`` numbers (1..k, int64).

    Examples
    --------
    >>> exact_single_linkage([[1, 0], [0.8, 0.6], [0, 1]], 0.25).tolist()
    [1, 1, 2]
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"exact_single_linkage: embeddings must be 2-D, got shape {x.shape}")
    if x.shape[0] < 2:
        return np.ones(x.shape[0], dtype=np.int64)
    z = linkage(x, method="single", metric="cosine")
    labels: IntArray = np.asarray(fcluster(z, t=eps, criterion="distance"), dtype=np.int64)
    return labels


def cluster_sizes(labels: npt.ArrayLike) -> IntArray:
    """Cluster sizes, largest first.

    Examples
    --------
    >>> cluster_sizes([3, 1, 3, 2, 3, 1]).tolist()
    [3, 2, 1]
    """
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return np.sort(counts.astype(np.int64))[::-1].copy()


def _dominance(labels: npt.ArrayLike, ratio: float, min_share: float) -> tuple[bool, Any, IntArray]:
    lab = np.asarray(labels)
    if lab.size == 0:
        return False, None, np.zeros(0, dtype=np.int64)
    uniq, counts = np.unique(lab, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    sizes = counts[order].astype(np.int64)
    largest = int(sizes[0])
    second = int(sizes[1]) if sizes.size > 1 else 0
    dominant_ratio = largest >= 2 if second == 0 else largest >= ratio * second
    ok = dominant_ratio and largest >= min_share * lab.size
    return ok, uniq[order[0]], sizes


def dominant_cluster(labels: npt.ArrayLike, ratio: float, min_share: float) -> Any:
    """Label of the largest cluster if it dominates, else ClusteringError.

    Dominant means ``largest >= ratio * second`` (no second cluster counts as
    dominant only if the largest has at least 2 members) and ``largest >=
    min_share * n``.

    Examples
    --------
    >>> dominant_cluster([7, 7, 7, 7, 2, 5], ratio=2.0, min_share=0.5)
    7
    """
    ok, lab, sizes = _dominance(labels, ratio, min_share)
    if not ok:
        n = int(sizes.sum())
        raise ClusteringError(
            f"no dominant cluster: top sizes {sizes[:5].tolist()} of {n} rows; need largest >= "
            f"{ratio:g} x second and >= {min_share:g} of rows"
        )
    return lab.item() if hasattr(lab, "item") else lab


def identity_clusters(sizes: IntArray, identity_min_size: int) -> int:
    """Clusters of at least ``identity_min_size`` members other than the largest (``sizes`` largest first).

    >>> identity_clusters(np.array([40, 10, 9, 3, 1]), 5)
    2
    """
    return int(np.count_nonzero(np.asarray(sizes)[1:] >= identity_min_size))


def separated_limit(counts: npt.ArrayLike, tolerance: float) -> int:
    """Index of the last grid eps at which identities are still separate.

    From the first peak of ``counts`` (identity-sized clusters per ascending eps) walk up while
    the count stays >= ``(1 - tolerance) * peak``; past that eps identity-sized clusters vanish,
    absorbed by the largest cluster or merged with each other.

    >>> separated_limit([0, 20, 46, 45, 43, 42, 40, 37, 27], 0.1)
    5
    """
    c = np.asarray(counts, dtype=np.int64)
    peak = int(np.argmax(c))
    floor = (1.0 - tolerance) * c[peak]
    last = peak
    while last + 1 < c.size and c[last + 1] >= floor:
        last += 1
    return last


def _eps_table(x: F64, grid: F64, ratio: float, min_share: float) -> list[tuple[float, IntArray, IntArray, bool]]:
    """Per grid eps (ascending): labels, sizes and dominance of one scipy single linkage cut there."""
    z = linkage(x, method="single", metric="cosine")
    rows = []
    for eps in grid:
        lab = fcluster(z, t=float(eps), criterion="distance").astype(np.int64)
        ok, _, sizes = _dominance(lab, ratio, min_share)
        rows.append((float(eps), lab, sizes, ok))
    return rows


def first_absorption(labels_per_eps: list[IntArray], identity_min_size: int) -> int | None:
    """Index of the first grid eps whose largest cluster took in another cluster of >= ``identity_min_size``.

    The largest cluster at eps ``k`` is made of clusters of eps ``k - 1``; besides its biggest part
    (the previous core), any part of ``identity_min_size`` or more images is an absorbed identity.

    >>> first_absorption([np.array([1, 1, 1, 2, 2, 2, 3]), np.array([1, 1, 1, 1, 1, 1, 3])], 3)
    1
    """
    for k in range(1, len(labels_per_eps)):
        cur, prev = labels_per_eps[k], labels_per_eps[k - 1]
        parts = np.sort(np.unique(prev[cur == np.bincount(cur).argmax()], return_counts=True)[1])[::-1]
        if parts.size > 1 and parts[1] >= identity_min_size:
            return k
    return None


def _candidates(rows: list, counts: list[int], tolerance: float, identity_min_size: int,
                separated: bool) -> tuple[list, str, int]:
    """Grid rows to try, best first, the rule that limits them, and the last index the rule allows."""
    if separated:
        limit = separated_limit(counts, tolerance)
        return list(reversed(rows[: limit + 1])), "largest eps before identities merge", limit
    absorbed = first_absorption([r[1] for r in rows], identity_min_size)
    limit = len(rows) - 1 if absorbed is None else absorbed - 1
    apart = [r for r in rows[: limit + 1] if r[2].size > 1]  # one cluster holding every row is no UI
    return list(reversed(apart)), "largest eps before the largest cluster absorbs an identity-sized one", limit


def _no_ui_message(table: list, limit: int, ratio: float, min_share: float, n: int, separated: bool) -> str:
    sizes = "; ".join(f"eps={e:g}: {s} ({c} identity-sized)" for e, s, c in table)
    need = f"largest >= {ratio:g} x second and >= {min_share:g} of {n} rows"
    what = "identities stay separate" if separated else "the largest cluster absorbs no identity-sized cluster"
    return f"no UI here: {what} up to eps={table[limit][0]:g} and no cluster up to there has {need}; top sizes per eps: {sizes}"


def choose_eps(
    embeddings: npt.ArrayLike, grid: npt.ArrayLike, ratio: float, min_share: float, *,
    identity_min_size: int, identity_tolerance: float,
) -> EpsChoice:
    """The largest eps in ``grid`` at which identities are still separate and the largest cluster dominates.

    The paper's UI is the largest cluster, far above the next, at the cut where identities are
    still separate. Identities count as separate up to :func:`separated_limit` of the number of
    clusters with >= ``identity_min_size`` members outside the largest; among those eps the
    largest one with a dominant cluster (:func:`dominant_cluster`) is chosen, so the UI gathers
    as many unrecognizable images as it can before it absorbs identities. When the data show too
    few identity-sized clusters for that (fewer than ``1 / identity_tolerance`` at every eps,
    e.g. one image per person), the limit is instead the eps before the largest cluster first
    takes in a cluster of ``identity_min_size`` or more (:func:`first_absorption`), and a cut
    that puts every row in one cluster is never a UI; ``rule`` says which. ``size_table`` lists
    per eps the top-5 sizes and that count. Raises ClusteringError ("no UI here", with the
    table) when no eps qualifies, e.g. on recognizable faces only.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    g = np.unique(np.asarray(grid, dtype=np.float64).ravel())
    if g.size == 0:
        raise ValueError("choose_eps: grid is empty")
    if x.ndim != 2 or x.shape[0] < 2:
        raise ClusteringError(f"choose_eps needs at least 2 embeddings, got shape {x.shape}")
    rows = _eps_table(x, g, ratio, min_share)
    table = [(eps, sizes[:5].tolist(), identity_clusters(sizes, identity_min_size)) for eps, _, sizes, _ in rows]
    counts = [c for _, _, c in table]
    separated = max(counts) * identity_tolerance >= 1  # identities visible: one may vanish within the tolerance
    candidates, rule, limit = _candidates(rows, counts, identity_tolerance, identity_min_size, separated)
    chosen = next((r for r in candidates if r[3]), None)
    if chosen is None:
        raise ClusteringError(_no_ui_message(table, limit, ratio, min_share, x.shape[0], separated))
    return EpsChoice(eps=chosen[0], labels=chosen[1], size_table=table, rule=rule)


# --------------------------------------------------------------------------- capped cells


@dataclass(frozen=True)
class CellPlan:
    """How each coarse cell is cut: ``sub_centres[c]`` for the cells expected to exceed the cap.

    A cell expected to hold at most ``max_cell_rows`` rows is one group, clustered exactly. A
    larger cell is a dense region (a coarse quantiser puts the whole UI in one or two cells):
    a second-level quantiser trained on that cell's sample rows cuts it into sub-cells of about
    half the cap, and each of its points joins its ``nprobe`` nearest sub-cells, so neighbours
    stay together and sub-cells overlap. Every group then costs about ``max_cell_rows^2``
    comparisons at most, and the total grows linearly with the rows however dense a region is.
    Group ids: cell ``c`` is group ``c`` when uncut, else groups ``offsets[c] + j``.
    """

    n_cells: int
    sub_centres: dict[int, npt.NDArray[np.float32]]
    offsets: dict[int, int]

    @property
    def groups(self) -> int:
        """Groups (tasks' units of work): uncut cells plus the sub-cells of the cut ones."""
        return self.n_cells - len(self.sub_centres) + sum(c.shape[0] for c in self.sub_centres.values())


def plan_cells(sample: npt.ArrayLike, sample_cells: npt.ArrayLike, expected_rows: npt.ArrayLike, *,
               max_cell_rows: int, nprobe: int, seed: int) -> CellPlan:
    """Sub-centres for every cell whose ``expected_rows`` exceed ``max_cell_rows``.

    ``sample`` are unit rows and ``sample_cells`` their ``(n, nprobe)`` nearest cells; a cut cell
    gets ``ceil(2 * nprobe * expected / max_cell_rows)`` sub-centres (at most its sample rows).
    """
    if max_cell_rows < 2:
        raise ValueError(f"plan_cells: max_cell_rows must be >= 2, got {max_cell_rows}")
    x = np.asarray(sample, dtype=np.float32)
    cells = np.asarray(sample_cells, dtype=np.int64).reshape(x.shape[0], -1)
    expected = np.asarray(expected_rows, dtype=np.float64)
    subs: dict[int, npt.NDArray[np.float32]] = {}
    offsets: dict[int, int] = {}
    next_group = expected.size
    for c in np.flatnonzero(expected > max_cell_rows).tolist():
        rows = np.flatnonzero((cells == c).any(axis=1))
        k = int(np.ceil(2 * nprobe * expected[c] / max_cell_rows))
        if rows.size < 2:
            continue
        subs[c] = spherical_kmeans(x[rows], k, seed + 1 + c)
        offsets[c] = next_group
        next_group += subs[c].shape[0]
    return CellPlan(n_cells=int(expected.size), sub_centres=subs, offsets=offsets)


def group_memberships(x: npt.ArrayLike, cells: npt.ArrayLike, plan: CellPlan, nprobe: int) -> tuple[IntArray, IntArray]:
    """``(row, group)`` for unit rows ``x`` with nearest ``cells`` ``(n, nprobe)``: one entry per group joined.

    A row joins each uncut cell it is in, and its ``nprobe`` nearest sub-cells of each cut one.

    >>> plan = CellPlan(n_cells=2, sub_centres={1: np.eye(2, dtype=np.float32)}, offsets={1: 2})
    >>> rows, groups = group_memberships(np.eye(2), np.array([[0], [1]]), plan, nprobe=1)
    >>> rows.tolist(), groups.tolist()
    ([0, 1], [0, 3])
    """
    unit = np.asarray(x, dtype=np.float32)
    near = np.asarray(cells, dtype=np.int64).reshape(unit.shape[0], -1)
    rows = np.repeat(np.arange(unit.shape[0], dtype=np.int64), near.shape[1])
    flat = near.ravel()
    cut = np.isin(flat, np.fromiter(plan.sub_centres, dtype=np.int64, count=len(plan.sub_centres)))
    out_rows, out_groups = [rows[~cut]], [flat[~cut]]
    for c in np.unique(flat[cut]).tolist():
        r = rows[flat == c]
        sub = nearest_cells(unit[r], plan.sub_centres[c], nprobe)
        out_rows.append(np.repeat(r, sub.shape[1]))
        out_groups.append(plan.offsets[c] + sub.ravel())
    return np.concatenate(out_rows), np.concatenate(out_groups)


def faiss_module() -> Any:
    """faiss (faiss-cpu), imported where it is used so that ``import ers_spark`` stays light."""
    import faiss  # type: ignore[import-untyped,unused-ignore]

    return faiss


def nearest_cells(x: npt.ArrayLike, centres: npt.ArrayLike, nprobe: int) -> IntArray:
    """Indices of the ``nprobe`` nearest unit ``centres`` of each unit row (inner product, faiss)."""
    c = np.ascontiguousarray(centres, dtype=np.float32)
    q = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss_module().IndexFlatIP(c.shape[1])
    index.add(c)
    _, nearest = index.search(q, min(nprobe, c.shape[0]))
    return nearest.astype(np.int64)


def spherical_kmeans(x: npt.ArrayLike, k: int, seed: int, niter: int = 10) -> npt.NDArray[np.float32]:
    """Unit centres of a spherical k-means (faiss) of the unit rows ``x``; k is capped at the row count."""
    sample = np.ascontiguousarray(x, dtype=np.float32)
    k = max(1, min(int(k), sample.shape[0]))
    km = faiss_module().Kmeans(sample.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                         max_points_per_centroid=max(256, sample.shape[0] // k + 1))
    km.train(sample)
    centres: npt.NDArray[np.float32] = np.asarray(km.centroids, dtype=np.float32)
    return centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)


def expected_cell_rows(sample_cells: npt.ArrayLike, n_cells: int, n_rows: int) -> F64:
    """Rows each cell will hold (``nprobe`` entries per row), scaled up from a sample's assignments."""
    cells = np.asarray(sample_cells, dtype=np.int64)
    n_sample = max(1, cells.shape[0])
    return np.bincount(cells.ravel(), minlength=n_cells).astype(np.float64) * (n_rows / n_sample)


def capped_single_linkage(ids: npt.ArrayLike, x: npt.ArrayLike, eps: float, centres: npt.ArrayLike, *,
                          nprobe: int, max_cell_rows: int, seed: int = 0, block_size: int = 2048) -> IntArray:
    """Labels (smallest member id) of the capped-cell single linkage, in one process.

    The same steps as locate-ui's distributed graph method, for tests and benchmarks: every row
    goes to its ``nprobe`` nearest cells, oversized cells are cut by a second-level quantiser
    (:func:`plan_cells`, trained here on all rows), each group's eps-graph is compressed by
    :func:`eps_spanning_links`, and the links' components are the clusters. Exact single
    linkage when no cell is cut and ``nprobe`` covers every cell.
    """
    pid = np.asarray(ids, dtype=np.int64)
    unit = np.asarray(x, dtype=np.float32)
    cells = nearest_cells(unit, centres, nprobe)
    expected = expected_cell_rows(cells, len(centres), pid.size)
    plan = plan_cells(unit, cells, expected, max_cell_rows=max_cell_rows, nprobe=nprobe, seed=seed)
    rows, groups = group_memberships(unit, cells, plan, nprobe)
    src, dst = [pid[:0]], [pid[:0]]
    for g in np.unique(groups):
        members = rows[groups == g]
        out = eps_spanning_links(pid[members], unit[members], eps, block_size)
        src.append(out.src)
        dst.append(out.dst)
    return links_to_labels(pid, np.concatenate(src), np.concatenate(dst))


def jaccard(a_ids: npt.ArrayLike, b_ids: npt.ArrayLike) -> float:
    """Jaccard index of two id sets (duplicates ignored); 1.0 when both are empty.

    Examples
    --------
    >>> jaccard([1, 2, 3], [2, 3, 4])
    0.5
    """
    a = np.unique(np.asarray(a_ids))
    b = np.unique(np.asarray(b_ids))
    if a.size == 0 and b.size == 0:
        return 1.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)
