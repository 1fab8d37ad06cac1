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
    a second-level quantiser trained on that cell's sample rows cuts it into sub-cells, and each of
    its points joins its ``nprobe`` nearest sub-cells (of all its cells together when they are all
    cut: a sub-cell then holds about ``max_cell_rows / nprobe`` rows, else about the cap), so
    neighbours stay together and sub-cells overlap. Every group then costs about ``max_cell_rows^2``
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
    that each sub-cell holds about the cap when each of its rows joins ``nprobe`` of them.

    >>> sub_cell_count(8000, max_cell_rows=8192, nprobe=2), sub_cell_count(20000, max_cell_rows=8192, nprobe=2)
    (1, 5)
    """
    if expected_rows <= max_cell_rows:
        return 1
    return int(np.ceil(nprobe * expected_rows / max_cell_rows))


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

    A row joins each uncut cell it is in; in a cut one, its ``nprobe`` nearest sub-cells. A row whose
    cells are all cut (every row, past about 1e7 rows) joins the ``nprobe`` nearest sub-cells of all of
    them together, so it is sent ``nprobe`` times whatever the table's size, as below the cut.

    >>> plan = CellPlan(n_cells=2, sub_centres={1: np.eye(2, dtype=np.float32)}, offsets={1: 2})
    >>> rows, groups = group_memberships(np.eye(2), np.array([[0], [1]]), plan, nprobe=1)
    >>> rows.tolist(), groups.tolist()
    ([0, 1], [0, 3])
    """
    unit = np.asarray(x, dtype=np.float32)
    near = np.asarray(cells, dtype=np.int64).reshape(unit.shape[0], -1)
    if not plan.sub_centres:
        return np.repeat(np.arange(unit.shape[0], dtype=np.int64), near.shape[1]), near.ravel()
    is_cut = np.zeros(plan.n_cells, bool)
    is_cut[list(plan.sub_centres)] = True
    cut = is_cut[near]
    uncut_rows, uncut_slots = np.nonzero(~cut)
    out_rows, out_groups = [uncut_rows.astype(np.int64)], [near[uncut_rows, uncut_slots]]
    entry_rows, entry_slots = np.nonzero(cut)  # (row, slot) of each cut cell a row is in
    if entry_rows.size:
        entry_cells = near[entry_rows, entry_slots]
        sims = _sub_cell_sims(unit, entry_rows, entry_cells, plan)
        offsets = np.zeros(plan.n_cells, np.int64)
        offsets[list(plan.offsets)] = list(plan.offsets.values())
        together = cut.all(axis=1)[entry_rows]
        # rows with some uncut cell: the nprobe nearest sub-cells of each cut cell
        apart = ~together
        if apart.any():
            r, j = _top_columns(sims if apart.all() else sims[apart], nprobe)
            out_rows.append(entry_rows[apart][r])
            out_groups.append(offsets[entry_cells[apart][r]] + j)
        # rows whose cells are all cut: the nprobe nearest sub-cells of them all (entries are in row order)
        if together.any():
            width = near.shape[1]
            stacked = (sims if together.all() else sims[together]).reshape(-1, width * sims.shape[1])
            r, flat = _top_columns(stacked, nprobe)
            first = np.flatnonzero(together)[::width]
            slot, j = np.divmod(flat, sims.shape[1])
            out_rows.append(entry_rows[first][r])
            out_groups.append(offsets[entry_cells[first[r] + slot]] + j)
    return np.concatenate(out_rows), np.concatenate(out_groups)


def _sub_cell_sims(unit: np.ndarray, entry_rows: IntArray, entry_cells: IntArray, plan: CellPlan) -> np.ndarray:
    """``(entries, most sub-centres)``: each entry's row against its cell's sub-centres (-inf past their count).

    One matrix product per cut cell over all of its entries (sorted by cell), so a cell's sub-centres are
    read once per call, not once per row.
    """
    width = max(c.shape[0] for c in plan.sub_centres.values())
    sims = np.full((entry_rows.size, width), -np.inf, np.float32)
    order = np.argsort(entry_cells, kind="stable")
    sorted_cells = entry_cells[order]
    starts = np.flatnonzero(np.r_[True, sorted_cells[1:] != sorted_cells[:-1]])
    ends = np.r_[starts[1:], sorted_cells.size]
    for start, end in zip(starts.tolist(), ends.tolist()):
        idx = order[start:end]
        subs = plan.sub_centres[int(sorted_cells[start])]
        sims[idx, : subs.shape[0]] = unit[entry_rows[idx]] @ subs.T
    return sims


def _top_columns(work: np.ndarray, k: int) -> tuple[IntArray, IntArray]:
    """``(row, column)`` of the ``k`` largest finite values of each row (by repeated argmax: k is small).

    Overwrites the values it picks with -inf (``work`` is the caller's scratch, not copied: it can be large).
    """
    if work.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows_out, cols_out = [], []
    every = np.arange(work.shape[0])
    for _ in range(min(k, work.shape[1])):
        best = work.argmax(axis=1)
        found = np.isfinite(work[every, best])
        rows_out.append(every[found])
        cols_out.append(best[found])
        work[every, best] = -np.inf
    return np.concatenate(rows_out).astype(np.int64), np.concatenate(cols_out).astype(np.int64)


def nearest_cells(x: npt.ArrayLike, centres: npt.ArrayLike, nprobe: int) -> IntArray:
    """Indices of the ``nprobe`` nearest unit ``centres`` of each unit row (inner product, faiss)."""
    c = np.ascontiguousarray(centres, dtype=np.float32)
    q = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss_module().IndexFlatIP(c.shape[1])
    index.add(c)
    _, nearest = index.search(q, min(nprobe, c.shape[0]))
    return nearest.astype(np.int64)


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
