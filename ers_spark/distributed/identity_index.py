"""The nearest entry of *another* identity, through cells over the entries: an inverted-file index on Spark.

Label-noise cleaning asks, for each image far from its own identity, which other identity's centre is
nearest; 1:N search asks, for each probe, the best gallery score of another identity. With millions of
identities a cross join of queries and entries grows as queries x identities. Here the entries are cut into
cells of about ``cell_rows`` by a spherical k-means trained on a bounded seeded sample of them; each entry
joins its nearest cell, each query its ``nprobe`` nearest cells, and one task per cell compares the two
(:func:`ers_spark.core.subcentres.best_other_cosine`). The shuffle grows as queries x ``nprobe`` plus
entries; the driver holds the sample and the cell centres, never entries in proportion to the identities.

Exact when the cells are at most ``nprobe`` (every cell probed: up to ``nprobe x cell_rows`` entries, 8,192
with the defaults); beyond that, the nearest entry is missed only when it lies outside a query's ``nprobe``
nearest cells (an image moved into another person's folder sits next to that person's centre).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ers_spark.core.cells import nearest_cells
from ers_spark.core.clustering import faiss_module, spherical_kmeans
from ers_spark.core.ers import normalize_rows
from ers_spark.core.subcentres import best_other_cosine
from ers_spark.distributed.arrow import arrow_lists, arrow_matrix
from ers_spark.distributed.sampling import seeded_sample
from ers_spark.lake.contracts import IDENTITY

ENTRY_CELL_ROWS = 1024  # entries per cell: a cell's task compares its queries with about this many
NPROBE = 8  # cells each query searches
MAX_CELLS = 4096  # the cells' k-means is trained on the driver: bounded whatever the identities
SAMPLE_PER_CELL = 16  # sampled entries per cell for that k-means

OTHER_COS = "_other_cos"
OTHER_IDENTITY = "_other_identity"
_CELL = "_cell"
_VEC = "_vec"
_KEY = "_key"


def cell_count(n_entries: int, cell_rows: int = ENTRY_CELL_ROWS) -> int:
    """Cells over ``n_entries``: about ``cell_rows`` entries each, at most ``MAX_CELLS``.

    >>> cell_count(40), cell_count(4_000_000), cell_count(100_000_000)
    (1, 3907, 4096)
    """
    return int(min(MAX_CELLS, max(1, -(-n_entries // cell_rows))))


def nearest_other_entries(queries: DataFrame, key: str, query_vector: str, entries: DataFrame, entry_vector: str, *,
                          seed: int, cell_rows: int = ENTRY_CELL_ROWS, nprobe: int = NPROBE) -> DataFrame:
    """(``key``, ``OTHER_COS``, ``OTHER_IDENTITY``): per query row, its largest cosine to an entry of another identity.

    ``queries`` carry ``key``, ``identity`` and ``query_vector``; ``entries`` carry ``identity`` and
    ``entry_vector`` (several rows per identity allowed). A query with no other identity in its cells is absent.
    """
    n_entries = entries.count()
    cells = cell_count(n_entries, cell_rows)
    centres = _train_cells(entries, entry_vector, n_entries, cells, seed)
    probe = min(nprobe, centres.shape[0])
    entry_cells = entries.select(IDENTITY, F.col(entry_vector).alias(_VEC)).mapInArrow(
        _to_cells(centres, 1, [IDENTITY]), f"{_CELL} int, {IDENTITY} string, {_VEC} array<float>")
    query_cells = queries.select(F.col(key).cast("string").alias(_KEY), IDENTITY, F.col(query_vector).alias(_VEC)).mapInArrow(
        _to_cells(centres, probe, [_KEY, IDENTITY]), f"{_CELL} int, {_KEY} string, {IDENTITY} string, {_VEC} array<float>")
    found = query_cells.groupBy(_CELL).cogroup(entry_cells.groupBy(_CELL)).applyInArrow(
        _best_in_cell, f"{_KEY} string, {OTHER_COS} double, {OTHER_IDENTITY} string")
    best = found.groupBy(_KEY).agg(F.max(OTHER_COS).alias(OTHER_COS), F.max_by(OTHER_IDENTITY, OTHER_COS).alias(OTHER_IDENTITY))
    return best.withColumnRenamed(_KEY, key)


def _train_cells(entries: DataFrame, vector: str, n_entries: int, cells: int, seed: int) -> np.ndarray:
    """Unit cell centres: spherical k-means of a seeded sample of at most ``SAMPLE_PER_CELL x MAX_CELLS`` entries."""
    if cells == 1:
        return np.zeros((1, 1), np.float32)  # one cell: every entry and query meet there, no centre is needed
    rank = F.concat_ws("#", F.col(IDENTITY), F.xxhash64(F.col(vector)).cast("string"))  # unique per entry
    sample = seeded_sample(entries.select(rank.alias(_KEY), F.col(vector).alias(_VEC)), _KEY,
                           SAMPLE_PER_CELL * MAX_CELLS, seed, n_rows=n_entries).toArrow()
    return spherical_kmeans(normalize_rows(arrow_matrix(sample.column(_VEC))), cells, seed)


def _to_cells(centres: np.ndarray, probe: int, carried: list[str]):
    """mapInArrow function: each row once per cell it joins (its ``probe`` nearest cell centres)."""

    def to_cells(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        faiss_module().omp_set_num_threads(1)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            x = normalize_rows(arrow_matrix(batch.column(_VEC)))
            near = (np.zeros((x.shape[0], 1), np.int64) if centres.shape[0] == 1 else nearest_cells(x, centres, probe))
            rows = np.repeat(np.arange(x.shape[0]), near.shape[1])
            take = pa.array(rows)
            columns = [pa.array(near.ravel().astype(np.int32))] + [batch.column(c).take(take) for c in carried]
            yield pa.RecordBatch.from_arrays(columns + [arrow_lists(x[rows], pa.float32())],
                                             names=[_CELL, *carried, _VEC])

    return to_cells


def _best_in_cell(queries: pa.Table, entries: pa.Table) -> pa.Table:
    """cogroup function: one cell's queries against its entries."""
    if queries.num_rows == 0 or entries.num_rows == 0:
        return pa.table({_KEY: pa.array([], pa.string()), OTHER_COS: pa.array([], pa.float64()),
                         OTHER_IDENTITY: pa.array([], pa.string())})
    cos, who = best_other_cosine(arrow_matrix(queries.column(_VEC)), queries.column(IDENTITY).to_numpy(zero_copy_only=False),
                                 arrow_matrix(entries.column(_VEC)), entries.column(IDENTITY).to_numpy(zero_copy_only=False))
    found = np.isfinite(cos)
    keys = queries.column(_KEY).to_numpy(zero_copy_only=False)
    return pa.table({_KEY: pa.array(keys[found], pa.string()), OTHER_COS: pa.array(cos[found], pa.float64()),
                     OTHER_IDENTITY: pa.array(who[found].tolist(), pa.string())})
