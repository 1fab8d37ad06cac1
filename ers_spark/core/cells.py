"""Capped cells: how locate-ui cuts the points into groups small enough to cluster exactly.

Every point joins its ``nprobe`` nearest cells of a coarse quantiser (spherical k-means,
:mod:`ers_spark.core.clustering`); a cell expected to exceed ``max_cell_rows`` is cut again
into sub-cells (:class:`CellPlan`). The coarse level is bounded (``locate_ui.max_top_cells``), so a
larger table gets more sub-cells under the same cells, not more cells: finding a row's groups costs
about ``cells + nprobe x sub-cells per cell`` inner products whatever the table's size. Each group's eps-graph is then compressed by
:func:`~ers_spark.core.linkage.eps_spanning_links`; :func:`capped_single_linkage` runs the
whole method in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ers_spark.core.clustering import faiss_module, spherical_kmeans
from ers_spark.core.linkage import eps_spanning_links, links_to_labels

__all__ = [
    "CellPlan",
    "SUB_TRAIN_ROWS_PER_CENTRE",
    "sub_cell_count",
    "train_sub_centres",
    "plan_cells",
    "plan_from_sub_centres",
    "nearest_by_product",
    "group_memberships",
    "nearest_cells",
    "expected_cell_rows",
    "capped_single_linkage",
]

IntArray = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
SUB_TRAIN_ROWS_PER_CENTRE = 8  # rows a second-level k-means gets per sub-centre (fewer: the sizes are noise)


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


def sub_cell_count(expected_rows: float, *, max_cell_rows: int, nprobe: int) -> int:
    """Sub-cells a cell expected to hold ``expected_rows`` is cut into: 1 (uncut) up to the cap, else enough
    that each sub-cell holds about half the cap (each row joins ``nprobe`` of them).

    >>> sub_cell_count(8000, max_cell_rows=8192, nprobe=2), sub_cell_count(20000, max_cell_rows=8192, nprobe=2)
    (1, 10)
    """
    if expected_rows <= max_cell_rows:
        return 1
    return int(np.ceil(2 * nprobe * expected_rows / max_cell_rows))


def train_sub_centres(rows: npt.ArrayLike, expected_rows: float, *, max_cell_rows: int, nprobe: int,
                      seed: int) -> npt.NDArray[np.float32] | None:
    """Sub-centres of one cell from its (sample) ``rows``, or None when the cell stays whole.

    The same function cuts a cell on the driver (a sample that holds every row) and on the executors
    (one group per cell of a larger sample), so both plans cut alike.
    """
    x = np.asarray(rows, dtype=np.float32)
    k = sub_cell_count(expected_rows, max_cell_rows=max_cell_rows, nprobe=nprobe)
    if k < 2 or x.shape[0] < 2:
        return None
    return spherical_kmeans(x, k, seed, threads=1)


def plan_cells(sample: npt.ArrayLike, sample_cells: npt.ArrayLike, expected_rows: npt.ArrayLike, *,
               max_cell_rows: int, nprobe: int, seed: int) -> CellPlan:
    """Sub-centres for every cell whose ``expected_rows`` exceed ``max_cell_rows``.

    ``sample`` are unit rows and ``sample_cells`` their ``(n, nprobe)`` nearest cells; a cut cell
    gets :func:`sub_cell_count` sub-centres (at most its sample rows).
    """
    if max_cell_rows < 2:
        raise ValueError(f"plan_cells: max_cell_rows must be >= 2, got {max_cell_rows}")
    x = np.asarray(sample, dtype=np.float32)
    cells = np.asarray(sample_cells, dtype=np.int64).reshape(x.shape[0], -1)
    expected = np.asarray(expected_rows, dtype=np.float64)
    subs: dict[int, npt.NDArray[np.float32]] = {}
    for c in np.flatnonzero(expected > max_cell_rows).tolist():
        centres = train_sub_centres(x[(cells == c).any(axis=1)], float(expected[c]), max_cell_rows=max_cell_rows,
                                    nprobe=nprobe, seed=seed + 1 + c)
        if centres is not None:
            subs[c] = centres
    return plan_from_sub_centres(int(expected.size), subs)


def plan_from_sub_centres(n_cells: int, subs: dict[int, npt.NDArray[np.float32]]) -> CellPlan:
    """The plan of ``n_cells`` cells where cell ``c`` in ``subs`` is cut into those sub-centres (group ids
    after the cells', in cell order)."""
    offsets: dict[int, int] = {}
    next_group = n_cells
    for c in sorted(subs):
        offsets[c] = next_group
        next_group += subs[c].shape[0]
    return CellPlan(n_cells=n_cells, sub_centres={c: subs[c] for c in sorted(subs)}, offsets=offsets)


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
    if not plan.sub_centres:
        return rows, flat
    cut = np.isin(flat, np.fromiter(plan.sub_centres, dtype=np.int64, count=len(plan.sub_centres)))
    out_rows, out_groups = [rows[~cut]], [flat[~cut]]
    cut_rows, cut_cells = rows[cut], flat[cut]
    order = np.argsort(cut_cells, kind="stable")  # one slice per cut cell, not a scan of all entries per cell
    cut_rows, cut_cells = cut_rows[order], cut_cells[order]
    starts = np.flatnonzero(np.r_[True, cut_cells[1:] != cut_cells[:-1]])
    for start, end in zip(starts.tolist(), np.r_[starts[1:], cut_cells.size].tolist()):
        c, r = int(cut_cells[start]), cut_rows[start:end]
        sub = nearest_by_product(unit[r], plan.sub_centres[c], nprobe)
        out_rows.append(np.repeat(r, sub.shape[1]))
        out_groups.append(plan.offsets[c] + sub.ravel())
    return np.concatenate(out_rows), np.concatenate(out_groups)


def nearest_cells(x: npt.ArrayLike, centres: npt.ArrayLike, nprobe: int) -> IntArray:
    """Indices of the ``nprobe`` nearest unit ``centres`` of each unit row (inner product, faiss)."""
    c = np.ascontiguousarray(centres, dtype=np.float32)
    q = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss_module().IndexFlatIP(c.shape[1])
    index.add(c)
    _, nearest = index.search(q, min(nprobe, c.shape[0]))
    return nearest.astype(np.int64)


def nearest_by_product(x: npt.ArrayLike, centres: npt.ArrayLike, nprobe: int) -> IntArray:
    """The ``nprobe`` largest inner products of each row with ``centres`` (in no particular order), by one
    matrix product: for a cut cell's few rows and sub-centres, where building a faiss index costs more.

    >>> nearest_by_product(np.eye(3)[:2], np.eye(3), 1).tolist()
    [[0], [1]]
    """
    sims = np.asarray(x, dtype=np.float32) @ np.asarray(centres, dtype=np.float32).T
    k = min(nprobe, sims.shape[1])
    if k == sims.shape[1]:
        return np.broadcast_to(np.arange(k, dtype=np.int64), sims.shape).copy()
    return np.argpartition(-sims, k - 1, axis=1)[:, :k].astype(np.int64)


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
