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

from ers_spark.config import LocateUiConfig
from ers_spark.core.ers import normalize_rows
from ers_spark.core.cells import CellPlan, expected_cell_rows, group_memberships, nearest_cells, plan_cells
from ers_spark.core.clustering import faiss_module, spherical_kmeans
from ers_spark.core.linkage import eps_spanning_links
from ers_spark.distributed.arrow import F32, arrow_lists, arrow_matrix, to_numpy
from ers_spark.distributed.linkage import DST, SRC
from ers_spark.distributed.sampling import uniform_sample
from ers_spark.errors import ConfigError
from ers_spark.lake.contracts import EMBEDDING

log = logging.getLogger(__name__)
KMEANS_MAX_ITER = 10  # coarse cells only need to be roughly balanced, not converged

# internal column names (never written to a table)
POINT_ID = "_pid"  # dense int64 point id
GROUP = "_group"
RAW_EDGES = "raw_edges"
PAIR_COMPARISONS = "pair_comparisons"


def assign_cells(points: DataFrame, plan_bc: Broadcast, nprobe: int) -> DataFrame:
    """(pid, embedding) -> (group, pid, embedding): one row per group a point joins.

    A point goes to its ``nprobe`` nearest cells, and in a cut cell to its ``nprobe`` nearest
    sub-cells (:func:`~ers_spark.core.cells.group_memberships`).
    """

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        faiss_module().omp_set_num_threads(1)  # one task per core: faiss must not start a thread per core in each
        centres, plan = plan_bc.value
        for batch in batches:
            ids = batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64)
            x = arrow_matrix(batch.column(1))
            if x.shape[0] == 0:
                continue
            x = normalize_rows(x)
            rows, groups = group_memberships(x, nearest_cells(x, centres, nprobe), plan, nprobe)
            yield pa.RecordBatch.from_arrays(
                [pa.array(groups.astype(np.int32)), pa.array(ids[rows]), arrow_lists(x[rows], pa.float32())],
                names=[GROUP, POINT_ID, EMBEDDING],
            )

    return points.select(POINT_ID, EMBEDDING).mapInArrow(assign, f"{GROUP} int, {POINT_ID} long, {EMBEDDING} array<float>")


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
    """Coarse cells: the configured count, or enough that an average cell fills half of ``max_cell_rows``.

    Raises :class:`ConfigError` when the quantiser's driver sample holds fewer rows than cells
    (e.g. 1e9 rows with the defaults): k-means would silently train fewer cells than planned and
    the oversized cells could not be cut, so a run would go quadratic instead of failing.

    >>> from ers_spark.config import load_config
    >>> params = load_config(overrides=["locate_ui.nprobe=2", "locate_ui.max_cell_rows=8192"]).locate_ui
    >>> cell_count(10_000_000, params)
    4883
    >>> cell_count(1_000_000_000, params)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ers_spark.errors.ConfigError: locate_ui: 1000000000 rows need 488282 quantiser cells ...
    """
    if params.kmeans_cells is not None:
        cells = params.kmeans_cells
        fix = f"lower locate_ui.kmeans_cells to at most {params.kmeans_sample_rows}"
    else:
        cells = max(1, int(np.ceil(2 * n_rows * params.nprobe / params.max_cell_rows)))
        need = int(np.ceil(2 * n_rows * params.nprobe / params.kmeans_sample_rows))
        fix = f"raise locate_ui.max_cell_rows to at least {need}"
    if n_rows > params.kmeans_sample_rows and cells > params.kmeans_sample_rows:
        raise ConfigError(
            f"locate_ui: {n_rows} rows need {cells} quantiser cells but locate_ui.kmeans_sample_rows is "
            f"{params.kmeans_sample_rows}, fewer than one sampled row per cell; raise locate_ui.kmeans_sample_rows "
            f"to at least {cells} (the driver holds the sample) or {fix}"
        )
    return cells


def quantiser_plan(points: DataFrame, n_rows: int, params: LocateUiConfig) -> tuple[F32, CellPlan]:
    """Coarse quantiser (faiss spherical k-means on a driver sample) and the cut of each oversized cell.

    Cell sizes are estimated from the sample's own assignments (scaled to ``n_rows``), so no pass
    over the data is needed to find the oversized cells.
    """
    cells = cell_count(n_rows, params)  # first: an undersampled plan fails before the sample is drawn
    sample = driver_sample(points, n_rows, params)
    centres = spherical_kmeans(sample, cells, params.seed, KMEANS_MAX_ITER)
    nearest = nearest_cells(sample, centres, params.nprobe)
    expected = expected_cell_rows(nearest, centres.shape[0], n_rows)
    plan = plan_cells(sample, nearest, expected, max_cell_rows=params.max_cell_rows, nprobe=params.nprobe,
                      seed=params.seed)
    if plan.sub_centres:
        log.info("locate-ui: %d of %d cells expected above %d rows (largest %.0f) cut into %d sub-cells",
                 len(plan.sub_centres), centres.shape[0], params.max_cell_rows, expected.max(),
                 plan.groups - centres.shape[0] + len(plan.sub_centres))
    return centres, plan
