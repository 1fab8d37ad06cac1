"""Cells on Spark: the coarse quantiser planned on a driver sample, every point assigned to its groups, and
the eps-links found inside each group: the distributed side of :mod:`ers_spark.core.cells`
and :func:`ers_spark.core.linkage.eps_spanning_links`.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark.broadcast import Broadcast
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ers_spark.config import LocateUiConfig
from ers_spark.core.ers import normalize_rows
from ers_spark.core.cells import (
    SUB_TRAIN_ROWS_PER_CENTRE,
    CellPlan,
    expected_cell_rows,
    group_memberships,
    nearest_cells,
    plan_cells,
    plan_from_sub_centres,
    train_sub_centres,
)
from ers_spark.core.clustering import faiss_module, spherical_kmeans
from ers_spark.core.linkage import eps_spanning_links
from ers_spark.distributed.arrow import F32, arrow_lists, arrow_matrix, to_numpy
from ers_spark.distributed.linkage import DST, SRC
from ers_spark.distributed.sampling import hash_threshold, seeded_hash, uniform_sample
from ers_spark.lake.contracts import EMBEDDING, IMAGE_ID

log = logging.getLogger(__name__)
KMEANS_MAX_ITER = 10  # coarse cells only need to be roughly balanced, not converged
ASSIGN_CHUNK_ROWS = 65536  # rows assigned together (32 MB of 128-D floats): each cut cell's sub-centres read once

# internal column names (never written to a table)
POINT_ID = "_pid"  # dense int64 point id
GROUP = "_group"
CELL = "_cell"
SUB = "_sub"
RANK = "_rank"
RAW_EDGES = "raw_edges"
PAIR_COMPARISONS = "pair_comparisons"


def assign_cells(points: DataFrame, plan_bc: Broadcast, nprobe: int) -> DataFrame:
    """(pid, embedding) -> (group, pid, embedding): one row per group a point joins.

    A point goes to its ``nprobe`` nearest cells, and in a cut cell to its ``nprobe`` nearest
    sub-cells (:func:`~ers_spark.core.cells.group_memberships`). Arrow batches are gathered into chunks
    of ``ASSIGN_CHUNK_ROWS`` rows first: a cut cell's sub-centres are then read once for the many rows of
    the chunk that fall in it, not once for the one or two of a batch (at 1e9 rows, 4096 cut cells).
    """

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        faiss_module().omp_set_num_threads(1)  # one task per core: faiss must not start a thread per core in each
        centres, plan = plan_bc.value
        for ids, x in _chunks(batches, ASSIGN_CHUNK_ROWS):
            x = normalize_rows(x)
            rows, groups = group_memberships(x, nearest_cells(x, centres, nprobe), plan, nprobe)
            for start in range(0, rows.size, ASSIGN_CHUNK_ROWS):  # output batches of a bounded size
                part = rows[start:start + ASSIGN_CHUNK_ROWS]
                yield pa.RecordBatch.from_arrays(
                    [pa.array(groups[start:start + ASSIGN_CHUNK_ROWS].astype(np.int32)), pa.array(ids[part]),
                     arrow_lists(x[part], pa.float32())],
                    names=[GROUP, POINT_ID, EMBEDDING],
                )

    return points.select(POINT_ID, EMBEDDING).mapInArrow(assign, f"{GROUP} int, {POINT_ID} long, {EMBEDDING} array<float>")


def _chunks(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[tuple[np.ndarray, F32]]:
    """(ids, embeddings) of consecutive Arrow batches gathered to at least ``rows`` rows (the last chunk: what is left)."""
    ids: list[np.ndarray] = []
    xs: list[np.ndarray] = []
    held = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        ids.append(batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64))
        xs.append(arrow_matrix(batch.column(1)))
        held += batch.num_rows
        if held >= rows:
            yield np.concatenate(ids), np.concatenate(xs)
            ids, xs, held = [], [], 0
    if held:
        yield np.concatenate(ids), np.concatenate(xs)


def cell_links(assigned: DataFrame, eps: float, block_size: int) -> DataFrame:
    """Per group (an uncut cell or a sub-cell): the eps-graph compressed to point -> local-root links.

    The group's first row also carries its raw eps-pair count and its pair comparisons; a group
    without links emits one self-link for them (dropped by connected components).
    """

    def links(table: pa.Table) -> pa.Table:
        ids = table.column(POINT_ID).to_numpy()
        x = arrow_matrix(table.column(EMBEDDING))
        out = eps_spanning_links(ids, x, eps, block_size)
        src, dst = (out.src, out.dst) if out.src.size else (ids[:1], ids[:1])
        raw, pairs = np.zeros(src.size, np.int64), np.zeros(src.size, np.int64)
        raw[0], pairs[0] = out.raw_edge_count, ids.size * (ids.size - 1) // 2
        return pa.table({SRC: src, DST: dst, RAW_EDGES: raw, PAIR_COMPARISONS: pairs})

    schema = f"{SRC} long, {DST} long, {RAW_EDGES} long, {PAIR_COMPARISONS} long"
    return assigned.groupBy(GROUP).applyInArrow(links, schema)


def driver_sample(points: DataFrame, n_rows: int, params: LocateUiConfig) -> F32:
    """Unit embeddings of a seeded sample of at most ``kmeans_sample_rows`` rows (bounded, not data-sized)."""
    _, x = to_numpy(uniform_sample(points, n_rows, params.kmeans_sample_rows, params.seed + 1))
    return x


def cell_count(n_rows: int, params: LocateUiConfig) -> int:
    """Coarse cells: the configured count, or enough that an average cell fills half of ``max_cell_rows``, at most
    ``max_top_cells``: a larger table gets sub-cells under the same cells (:func:`quantiser_plan`), so a row's
    assignment costs the same at 1e7 rows as at 1e9.

    >>> from ers_spark.config import load_config
    >>> params = load_config(overrides=["locate_ui.nprobe=2", "locate_ui.max_cell_rows=8192"]).locate_ui
    >>> cell_count(1_000_000, params), cell_count(10_000_000, params), cell_count(1_000_000_000, params)
    (489, 4096, 4096)
    """
    if params.kmeans_cells is not None:
        return params.kmeans_cells
    return max(1, min(params.max_top_cells, int(np.ceil(2 * n_rows * params.nprobe / params.max_cell_rows))))


def quantiser_plan(points: DataFrame, n_rows: int, params: LocateUiConfig,
                   sizing_rows: int | None = None) -> tuple[F32, CellPlan]:
    """Coarse quantiser (faiss spherical k-means on a bounded driver sample) and the cut of each oversized cell.

    When the driver sample is the whole table, cell sizes are counted on it and the cut cells' sub-centres
    trained on it. Otherwise one pass over a larger seeded sample on the executors counts each cell's rows and
    trains its sub-centres there (:func:`sampled_sub_centres`): the driver holds the bounded sample and the
    centres, never rows in proportion to the table. ``sizing_rows`` plans for a table of that many rows
    (the scale benchmark plans a 1e9-row table on 1e7 rows); default ``n_rows``.
    """
    sizing = n_rows if sizing_rows is None else int(sizing_rows)
    cells = cell_count(sizing, params)
    sample = driver_sample(points, n_rows, params)
    centres = spherical_kmeans(sample, cells, params.seed, KMEANS_MAX_ITER)
    if sample.shape[0] >= n_rows and sizing == n_rows:
        nearest = nearest_cells(sample, centres, params.nprobe)
        expected = expected_cell_rows(nearest, centres.shape[0], n_rows)
        plan = plan_cells(sample, nearest, expected, max_cell_rows=params.max_cell_rows, nprobe=params.nprobe,
                          seed=params.seed)
    else:
        plan = sampled_sub_centres(points, n_rows, sizing, centres, params)
    if plan.sub_centres:
        log.info("locate-ui: %d of %d cells above %d rows cut into %d sub-cells", len(plan.sub_centres),
                 centres.shape[0], params.max_cell_rows, plan.groups - centres.shape[0] + len(plan.sub_centres))
    return centres, plan


def sub_sample_share(n_rows: int, sizing_rows: int, params: LocateUiConfig) -> float:
    """The share of rows that gives every cut cell about ``SUB_TRAIN_ROWS_PER_CENTRE`` rows per sub-centre.

    A cell expected to hold E rows gets ``nprobe E / max_cell_rows`` sub-centres (:func:`~ers_spark.core.cells.sub_cell_count`),
    so the share does not depend on the cell: 8 x 2 / 8192 = 0.2 % of the rows with the defaults.

    >>> from ers_spark.config import load_config
    >>> round(sub_sample_share(10**7, 10**7, load_config().locate_ui), 5), sub_sample_share(100, 100, load_config().locate_ui) < 1
    (0.00195, True)
    """
    need = SUB_TRAIN_ROWS_PER_CENTRE * params.nprobe / params.max_cell_rows * sizing_rows / max(1, n_rows)
    return min(1.0, need)


def sampled_sub_centres(points: DataFrame, n_rows: int, sizing_rows: int, centres: F32,
                        params: LocateUiConfig) -> CellPlan:
    """Count every cell's rows in a seeded sample and train the oversized cells' sub-centres, on the executors.

    One pass: a hash threshold keeps :func:`sub_sample_share` of the rows (the same rows whatever the
    partitioning), each kept row goes to its ``nprobe`` nearest cells, and one task per cell scales its
    count to the table (``sizing_rows``) and runs :func:`~ers_spark.core.cells.train_sub_centres` on
    them, in hash order so any recompute trains the same centres. Only the sub-centres come back.
    """
    share = sub_sample_share(n_rows, sizing_rows, params)
    scale = sizing_rows / (n_rows * share)
    nprobe, cap, seed = params.nprobe, params.max_cell_rows, params.seed
    top = np.ascontiguousarray(centres, dtype=np.float32)  # travels in the functions' closures (4096 x d at most)
    ranked = points.select(EMBEDDING, seeded_hash(seed + 3, IMAGE_ID).alias(RANK))
    if share < 1.0:
        ranked = ranked.where(F.col(RANK) < F.lit(hash_threshold(share)))

    def to_cells(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        faiss_module().omp_set_num_threads(1)
        for batch in batches:
            x = arrow_matrix(batch.column(0))
            if x.shape[0] == 0:
                continue
            x = normalize_rows(x)
            near = nearest_cells(x, top, nprobe)
            rows = np.repeat(np.arange(x.shape[0]), near.shape[1])
            rank = batch.column(1).to_numpy(zero_copy_only=False)
            yield pa.RecordBatch.from_arrays([pa.array(near.ravel().astype(np.int32)), pa.array(rank[rows]),
                                              arrow_lists(x[rows], pa.float32())], names=[CELL, RANK, EMBEDDING])

    def train(table: pa.Table) -> pa.Table:
        cell = int(table.column(CELL)[0].as_py())
        order = np.argsort(table.column(RANK).to_numpy(), kind="stable")
        x = arrow_matrix(table.column(EMBEDDING))[order]
        subs = train_sub_centres(x, table.num_rows * scale, max_cell_rows=cap, nprobe=nprobe, seed=seed + 1 + cell)
        if subs is None:
            subs = np.zeros((0, x.shape[1]), np.float32)
        return pa.table({CELL: pa.array(np.full(subs.shape[0], cell, np.int32)),
                         SUB: pa.array(np.arange(subs.shape[0], dtype=np.int32)),
                         EMBEDDING: arrow_lists(subs, pa.float32())})

    cells = ranked.mapInArrow(to_cells, f"{CELL} int, {RANK} long, {EMBEDDING} array<float>")
    trained = cells.groupBy(CELL).applyInArrow(train, f"{CELL} int, {SUB} int, {EMBEDDING} array<float>").toArrow()
    cell_of = trained.column(CELL).to_numpy()
    order = np.lexsort((trained.column(SUB).to_numpy(), cell_of))
    subs_x = arrow_matrix(trained.column(EMBEDDING))[order] if trained.num_rows else np.zeros((0, top.shape[1]), np.float32)
    cell_of = cell_of[order]
    subs = {int(c): subs_x[cell_of == c] for c in np.unique(cell_of)}
    return plan_from_sub_centres(int(top.shape[0]), subs)
