"""Single linkage on eps-neighbour graphs: the local building blocks of the distributed clustering.

Single linkage at threshold ``eps`` = connected components of the graph whose
edges join embeddings at cosine distance ``<= eps`` (``d = 1 - cos``, scipy's
``'cosine'`` metric; for unit rows this is ``cos >= 1 - eps``).

The distributed job runs :func:`eps_spanning_links` inside each partition (or
bucket): it finds all eps-edges with blocked matrix products and compresses
them on the fly into a spanning forest of star shape, ``point -> local root``,
so only ``O(n)`` links leave the partition however dense the graph is. A
global connected-components pass over those links gives the clusters
(:func:`links_to_labels` is its driver-side oracle).

:func:`exact_single_linkage` is the scipy reference and :func:`jaccard` compares
two clusterings' members; :mod:`ers_spark.core.ui_cluster` picks the UI cluster
and :mod:`ers_spark.core.cells` cuts the points into groups.
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

__all__ = [
    "LocalLinks",
    "eps_spanning_links",
    "links_to_labels",
    "exact_single_linkage",
    "jaccard",
]

IntArray = npt.NDArray[np.int64]


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
