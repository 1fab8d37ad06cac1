"""locate-ui stage: embeddings -> ui_centroids, ui_members (the unrecognizable-identity cluster).

The paper finds the unrecognizable identity (UI) as the dominant cluster of a
single-linkage clustering of all embeddings. Exact single linkage is O(n^2)
memory on one machine, so the default ``graph`` method distributes it:

1. a coarse quantiser (faiss spherical k-means, trained on a bounded
   driver-side sample) assigns every point to its ``nprobe`` nearest cells,
   so eps-pairs that straddle a cell border still meet in some cell;
2. a cell expected to hold more than ``max_cell_rows`` rows is a dense
   region (a coarse quantiser puts the whole UI in one or two cells): a
   second-level quantiser trained on its sample rows cuts it into sub-cells
   of about half the cap, each point joining its ``nprobe`` nearest
   sub-cells (:class:`~ers_spark.core.neighbours.CellPlan`). Every group then
   costs about ``max_cell_rows^2`` comparisons at most and the whole pass
   grows linearly with the rows;
3. inside each group :func:`~ers_spark.core.neighbours.eps_spanning_links`
   finds all eps-pairs exactly (blocked matrix products) and emits only
   ``point -> local root`` links (at most one per point and group);
4. a global connected-components pass over those links (DataFrame
   large-star / small-star alternation, or GraphFrames) gives the clusters;
   points in no link are singletons;
5. the largest component must dominate (same rule as
   :func:`~ers_spark.core.neighbours.dominant_cluster`); its members' unit
   embeddings are summed by one Spark aggregate and normalised on the
   driver into the UIC.

Single linkage is exact inside every uncut cell; the approximations are
eps-pairs whose points share no cell or sub-cell (``nprobe`` at both levels).
:func:`~ers_spark.core.neighbours.capped_single_linkage` runs the same steps
in one process for tests and benchmarks.

``sample-hac`` runs the paper's exact scipy single linkage on a uniform sample
of at most ``sample_hac_rows`` rows; only the sampled rows can be members.

Nothing is written when no dominant cluster is found (:class:`ClusteringError`).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.broadcast import Broadcast
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from ers_spark.config import ErsConfig, LocateUiConfig
from ers_spark.lake.contracts import (
    CENTROID,
    CREATED_AT,
    EMBEDDING,
    EMBEDDINGS,
    EPS,
    GAMMA,
    GAMMA_METHOD,
    GAMMA_PARAMS,
    CLUSTER_PARAMS,
    IMAGE_ID,
    INPUT_VERSION,
    MEAN_MEMBER_DISTANCE,
    MEMBER_COUNT,
    METHOD,
    MODEL_NAME,
    MODEL_VERSION,
    TOP_CLUSTER_SIZES,
    UI_CENTROIDS,
    UI_MEMBERS,
    UIC_ID,
)
from ers_spark.errors import ClusteringError, ConfigError, ErsUserError
from ers_spark.core.ers import normalize_rows, ui_centroid_from_sum
from ers_spark.lake.tables import (
    StageRun,
    append,
    changed_settings,
    latest_model,
    merge_insert_new,
    of_model,
    read_table,
    settings_json,
    table_exists,
    table_version,
)
from ers_spark.core.neighbours import (
    CellPlan,
    choose_eps,
    cluster_sizes,
    dominant_cluster,
    eps_spanning_links,
    exact_single_linkage,
    expected_cell_rows,
    faiss_module,
    group_memberships,
    links_to_labels,
    nearest_cells,
    plan_cells,
    spherical_kmeans,
)

__all__ = [
    "LocateUiParams",
    "UiResult",
    "run_locate_ui",
    "connected_components_builtin",
    "connected_components_graphframes",
    "check_dominance",
]

STAGE_NAME = "locate-ui"
log = logging.getLogger(__name__)
KMEANS_MAX_ITER = 10  # coarse cells only need to be roughly balanced, not converged
MAX_UICS_COMPARED = 50  # UICs of one embeddings version looked at for reuse (newest first)
CC_MAX_ITER = 64  # large-star/small-star converges in O(log n) rounds; a guard, not a tuning knob

# internal column names (never written to a table)
_ID = "_pid"  # dense int64 point id
_SRC = "src"
_DST = "dst"
_RAW = "raw_edges"
_PAIRS = "pair_comparisons"
_GROUP = "_group"
_NODE = "node"
_ROOT = "root"

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class LocateUiParams:
    """Everything locate-ui needs, validated before Spark reads anything (recorded as run params)."""

    method: str
    eps: float | None
    eps_grid: tuple[float, ...]
    dominance_ratio: float
    min_share: float
    identity_min_size: int
    identity_tolerance: float
    grid_sample_rows: int
    sample_hac_rows: int
    kmeans_cells: int | None
    kmeans_sample_rows: int
    kmeans_max_iter: int
    nprobe: int
    max_cell_rows: int
    block_size: int
    connected_components: str
    cc_one_task_max_links: int
    seed: int
    from_members: str | None

    @classmethod
    def from_config(cls, cfg: ErsConfig) -> "LocateUiParams":
        lu: LocateUiConfig = cfg.locate_ui
        grid = np.arange(lu.eps_grid_start, lu.eps_grid_stop + lu.eps_grid_step / 2, lu.eps_grid_step)
        return cls(
            method=lu.method,
            eps=lu.eps,
            eps_grid=tuple(float(round(g, 10)) for g in grid),
            dominance_ratio=float(lu.dominance_ratio),
            min_share=float(lu.min_share),
            identity_min_size=int(lu.identity_min_size),
            identity_tolerance=float(lu.identity_tolerance),
            grid_sample_rows=int(lu.grid_sample_rows),
            sample_hac_rows=int(lu.sample_hac_rows),
            kmeans_cells=None if lu.kmeans_cells is None else int(lu.kmeans_cells),
            kmeans_sample_rows=int(lu.kmeans_sample_rows),
            kmeans_max_iter=KMEANS_MAX_ITER,
            nprobe=int(lu.nprobe),
            max_cell_rows=int(lu.max_cell_rows),
            block_size=int(lu.block_size),
            connected_components=lu.connected_components,
            cc_one_task_max_links=int(lu.cc_one_task_max_links),
            seed=int(lu.seed),
            from_members=lu.from_members,
        )


@dataclass(frozen=True)
class UiResult:
    """What a clustering method found: members (a DataFrame of image_id), eps, sizes, counters."""

    members: DataFrame
    eps: float
    top_sizes: list[int]
    counts: dict[str, int]
    centroid_sum: F64 | None = None  # set when the members' sum is already known (sample-hac)
    member_count: int | None = None


# --------------------------------------------------------------------------- Arrow helpers


def _arrow_matrix(col: pa.Array | pa.ChunkedArray) -> F32:
    """A list<float> Arrow column of equal-length rows as an (n, d) float32 matrix (no Python loop)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(col)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if values.size % n:
        raise ErsUserError("embeddings of different lengths in one table; re-embed with one model")
    return values.reshape(n, values.size // n)


def _arrow_lists(x: npt.NDArray[Any], value_type: pa.DataType) -> pa.Array:
    """An (n, d) matrix as an Arrow list array (the Spark array<...> layout)."""
    n, d = x.shape
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32) if n else np.zeros(1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(x).ravel(), type=value_type))


def _member_sums(df: DataFrame) -> tuple[F64, int]:
    """Sum of the unit embeddings of ``df`` (column ``embedding``) and its row count, on the executors.

    Each Arrow batch is normalised and summed in the Python worker; the partial sums are then
    added up by one Spark aggregate over their positions, so the driver receives ``d + 1`` numbers
    (the count and one sum per dimension), however many members and batches there are.
    """

    def partial(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            x = _arrow_matrix(batch.column(0))
            if x.shape[0] == 0:
                continue
            s = np.concatenate([[float(x.shape[0])], normalize_rows(x).astype(np.float64).sum(axis=0)])
            yield pa.RecordBatch.from_arrays([_arrow_lists(s[None, :], pa.float64())], names=["s"])

    partials = df.select(EMBEDDING).mapInArrow(partial, "s array<double>")
    rows = partials.select(F.posexplode("s").alias("i", "v")).groupBy("i").agg(F.sum("v").alias("v")).collect()
    if not rows:
        return np.zeros(0, np.float64), 0
    values = np.zeros(len(rows), np.float64)
    for r in rows:  # d + 1 rows: the count at position 0, then the sums
        values[r["i"]] = r["v"]
    return values[1:], int(round(values[0]))


def _to_numpy(df: DataFrame) -> tuple[list[str], F32]:
    """Collect (image_id, embedding) rows as ids and a unit float32 matrix (via Arrow, no row loop)."""
    table = df.select(IMAGE_ID, EMBEDDING).toArrow()
    ids = table.column(IMAGE_ID).to_pylist()
    x = _arrow_matrix(table.column(EMBEDDING))
    return ids, (normalize_rows(x) if x.shape[0] else x)


def _sample(df: DataFrame, n_rows: int, at_most: int, seed: int) -> DataFrame:
    """A deterministic uniform sample of at most ``at_most`` rows (all rows when small)."""
    if n_rows <= at_most:
        return df
    frac = min(1.0, 1.1 * at_most / n_rows)  # Bernoulli sample a bit above the target, then cap
    return df.sample(withReplacement=False, fraction=frac, seed=seed).limit(at_most)


# --------------------------------------------------------------------------- dominance


def check_dominance(top_sizes: list[int], n_rows: int, ratio: float, min_share: float) -> None:
    """Raise :class:`ClusteringError` unless the largest cluster dominates.

    Same rule as :func:`ers_spark.core.neighbours.dominant_cluster`, but on cluster
    sizes (largest first, at least the top two) so the full-data labels never
    have to reach the driver.
    """
    largest = int(top_sizes[0]) if top_sizes else 0
    second = int(top_sizes[1]) if len(top_sizes) > 1 else 0
    ok = (largest >= 2 if second == 0 else largest >= ratio * second) and largest >= min_share * n_rows
    if not ok:
        raise ClusteringError(
            f"no dominant cluster: top sizes {list(top_sizes[:5])} of {n_rows} rows; need largest >= "
            f"{ratio:g} x second and >= {min_share:g} of rows"
        )


def _print_size_table(table: list[tuple[float, list[int], int]]) -> None:
    lines = "".join(f"\n  eps={eps:.4g}\ttop sizes {sizes}\t{n} identity-sized" for eps, sizes, n in table)
    log.info("locate-ui: top cluster sizes per eps (exact single linkage on the eps sample)%s", lines)


# --------------------------------------------------------------------------- input


# --------------------------------------------------------------------------- connected components


def _star_state(edges: DataFrame) -> bool:
    """True when the edges (x > y) form stars: every x has one edge and no y is also an x."""
    nodes = edges.select(F.col("x").alias("n"), F.lit(1).alias("ax"), F.lit(0).alias("ay")).unionByName(
        edges.select(F.col("y").alias("n"), F.lit(0).alias("ax"), F.lit(1).alias("ay"))
    )
    bad = (
        nodes.groupBy("n")
        .agg(F.sum("ax").alias("ax"), F.max("ay").alias("ay"))
        .where((F.col("ax") > 1) | ((F.col("ax") >= 1) & (F.col("ay") == 1)))
    )
    return bad.limit(1).count() == 0


def _large_star(edges: DataFrame) -> DataFrame:
    """Large-star: every node's larger neighbours are linked to its smallest neighbour (or itself)."""
    adj = edges.select(F.col("x").alias("u"), F.col("y").alias("v")).unionByName(
        edges.select(F.col("y").alias("u"), F.col("x").alias("v"))
    )
    m = adj.groupBy("u").agg(F.least(F.min("v"), F.col("u")).alias("m"))
    return adj.where(F.col("v") > F.col("u")).join(m, "u").select(F.col("v").alias("x"), F.col("m").alias("y"))


def _small_star(edges: DataFrame) -> DataFrame:
    """Small-star: every node and its smaller neighbours are linked to the smallest of them."""
    m = edges.groupBy("x").agg(F.min("y").alias("m"))
    j = edges.join(m, "x")
    return (
        j.select("x", F.col("m").alias("y"))
        .unionByName(j.where(F.col("y") != F.col("m")).select(F.col("y").alias("x"), F.col("m").alias("y")))
        .distinct()
    )


def _star_rounds(links: DataFrame, checkpoint_every: int) -> tuple[DataFrame, int]:
    """Large-star / small-star (Kiveris et al., 2014) until the edges form stars: ``(x, y)`` with y the root.

    Checkpoints every ``checkpoint_every`` rounds so the plan does not grow (reliable checkpoints in
    ``spark.checkpoint_dir``: a local checkpoint lives in executor memory and fails the job when an
    executor dies; the files go when their DataFrame is garbage-collected,
    ``spark.cleaner.referenceTracking.cleanCheckpoints``).
    """
    edges = (
        links.select(F.greatest(_SRC, _DST).alias("x"), F.least(_SRC, _DST).alias("y"))
        .where(F.col("x") != F.col("y"))
        .distinct()
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    rounds = 0
    previous: list[DataFrame] = [edges]
    while not _star_state(edges):
        if rounds >= CC_MAX_ITER:
            raise RuntimeError(f"connected components did not converge in {CC_MAX_ITER} rounds")
        rounds += 1
        edges = _small_star(_large_star(edges))
        if rounds % checkpoint_every == 0:
            edges = edges.checkpoint(eager=True)  # cuts the plan; in spark.checkpoint_dir, so a lost executor loses nothing
        else:
            edges = edges.persist(StorageLevel.MEMORY_AND_DISK)
        previous.append(edges)
        if len(previous) > 2:
            previous.pop(0).unpersist()
    return edges, rounds


def _contract(links: DataFrame) -> DataFrame:
    """Each node's label (the smallest local root it links to, or itself) and the links between labels.

    The cell links are stars (point -> its group's local root), so a point in one group, or in
    several groups with the same root, adds nothing: only points whose groups gave them different
    roots, and roots that are also members elsewhere, leave a link between labels. Every node is
    linked to its label in the input, so the labels' components are the nodes' components; a label
    is never larger than its node, so the smallest label of a component is its smallest node. Returns ``(node, label, is_root, roots)``.
    """
    real = links.select(_SRC, _DST).where(F.col(_SRC) != F.col(_DST))
    roles = real.select(F.col(_SRC).alias(_NODE), F.col(_DST).alias("r"), F.lit(False).alias("is_root")).unionByName(
        real.select(F.col(_DST).alias(_NODE), F.col(_DST).alias("r"), F.lit(True).alias("is_root"))
    )
    grouped = roles.groupBy(_NODE).agg(
        F.min("r").alias("r"), F.max("is_root").alias("is_root"), F.collect_set("r").alias("roots")
    )
    return grouped.select(_NODE, F.least(_NODE, "r").alias("label"), "is_root", "roots")


def _label_links(labelled: DataFrame) -> DataFrame:
    """``(src, dst)`` links between labels: label -> each other root of a node, a root -> its own label."""
    across = labelled.select(F.col("label").alias(_SRC), F.explode("roots").alias(_DST)).where(
        (F.col(_DST) != F.col(_SRC))
    )
    return across.unionByName(
        labelled.where(F.col("is_root") & (F.col(_NODE) != F.col("label"))).select(
            F.col(_NODE).alias(_SRC), F.col("label").alias(_DST)
        )
    )


def _one_task_components(links: DataFrame) -> DataFrame:
    """``(node, root)`` of a graph small enough for one task: scipy connected components in one Python worker."""

    def components(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        parts = [(b.column(0).to_numpy(), b.column(1).to_numpy()) for b in batches if b.num_rows]
        if not parts:
            return
        src, dst = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        nodes = np.unique(np.concatenate([src, dst]))
        yield pa.RecordBatch.from_arrays([pa.array(nodes), pa.array(links_to_labels(nodes, src, dst))],
                                         names=[_NODE, _ROOT])

    return links.repartition(1).mapInArrow(components, f"{_NODE} long, {_ROOT} long")


def connected_components_builtin(
    links: DataFrame, checkpoint_every: int = 2, one_task_max_links: int = 0
) -> tuple[DataFrame, int]:
    """Connected components of an undirected int64 graph given as ``(src, dst)`` links.

    The links are first contracted to links between labels (:func:`_contract`: one aggregate). When
    at most ``one_task_max_links`` of those remain, one task finishes them with scipy (memory bounded
    by that cap); otherwise large-star / small-star rounds run over them, checkpointed every
    ``checkpoint_every`` rounds. Returns ``(node, root)`` for every node in a link (root = smallest id
    of its component, roots included with ``node == root``), persisted, and the number of star rounds
    (0 when one task finished).
    """
    labelled = _contract(links).persist(StorageLevel.MEMORY_AND_DISK)
    label_links = _label_links(labelled).persist(StorageLevel.MEMORY_AND_DISK)
    n_label_links = label_links.count()
    if n_label_links <= one_task_max_links:
        label_roots, rounds, stars = _one_task_components(label_links), 0, None
    else:
        stars, rounds = _star_rounds(label_links, checkpoint_every)
        label_roots = stars.select(F.col("x").alias(_NODE), F.col("y").alias(_ROOT))
    out = (
        labelled.join(label_roots.withColumnRenamed(_NODE, "label"), "label", "left")
        .select(_NODE, F.coalesce(F.col(_ROOT), F.col("label")).alias(_ROOT))
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    out.count()  # materialise before the intermediates go
    for df in (labelled, label_links, stars):
        if df is not None:
            df.unpersist()
    log.info("locate-ui: connected components: %d links between labels, %d star rounds", n_label_links, rounds)
    return out, rounds


_GRAPHFRAMES_HINT = (
    "locate_ui.connected_components=graphframes needs the graphframes Python package and the "
    "GraphFrames jar on Spark's classpath (spark.packages, spark.jars_dir, or a jar built with "
    "deploy/build_graphframes_jar.sh); or use locate_ui.connected_components=builtin"
)


def require_graphframes(spark: SparkSession) -> None:
    """Fail fast, before any clustering work, when GraphFrames is asked for but cannot run.

    Raises
    ------
    ErsUserError
        The Python package is missing, or the JVM has no ``org.graphframes.GraphFrame`` class.
    """
    try:
        import graphframes  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except ImportError:
        raise ErsUserError(f"{_GRAPHFRAMES_HINT} (python package 'graphframes' is not installed)") from None
    jvm = getattr(spark, "_jvm", None)
    if jvm is None:
        return  # Spark Connect: the server's classpath is checked when the job runs
    from py4j.java_gateway import JavaClass

    # py4j resolves a name it cannot load as a JavaPackage (what graphframes-py itself calls into)
    if not isinstance(jvm.org.graphframes.GraphFrame, JavaClass):
        raise ErsUserError(f"{_GRAPHFRAMES_HINT} (the GraphFrames jar is not loaded)")


def connected_components_graphframes(spark: SparkSession, links: DataFrame) -> DataFrame:
    """``(node, root)`` via GraphFrames' connectedComponents (root = the smallest node id of the component).

    Uses the session's checkpoint directory and a checkpoint every 2 iterations.
    """
    require_graphframes(spark)
    from graphframes import GraphFrame  # type: ignore[import-untyped,unused-ignore]

    # self-loops alone make no component (as in the builtin pass): drop them before building the graph
    edges = links.where(F.col(_SRC) != F.col(_DST)).select(F.col(_SRC).alias("src"), F.col(_DST).alias("dst"))
    vertices = edges.select(F.col("src").alias("id")).unionByName(edges.select(F.col("dst").alias("id"))).distinct()
    cc = GraphFrame(vertices, edges).connectedComponents(checkpointInterval=2)
    return cc.select(F.col("id").alias(_NODE), F.col("component").alias(_ROOT))


# --------------------------------------------------------------------------- graph method


def _assign_cells(points: DataFrame, plan_bc: Broadcast, nprobe: int) -> DataFrame:
    """(pid, embedding) -> (group, pid, embedding): one row per group a point joins.

    A point goes to its ``nprobe`` nearest cells, and in a cut cell to its ``nprobe`` nearest
    sub-cells (:func:`~ers_spark.core.neighbours.group_memberships`).
    """

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        faiss_module().omp_set_num_threads(1)  # one task per core: faiss must not start a thread per core in each
        centres, plan = plan_bc.value
        for batch in batches:
            ids = batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64)
            x = _arrow_matrix(batch.column(1))
            if x.shape[0] == 0:
                continue
            x = normalize_rows(x)
            rows, groups = group_memberships(x, nearest_cells(x, centres, nprobe), plan, nprobe)
            yield pa.RecordBatch.from_arrays(
                [pa.array(groups.astype(np.int32)), pa.array(ids[rows]), _arrow_lists(x[rows], pa.float32())],
                names=[_GROUP, _ID, EMBEDDING],
            )

    return points.select(_ID, EMBEDDING).mapInArrow(assign, f"{_GROUP} int, {_ID} long, {EMBEDDING} array<float>")


def _cell_links(assigned: DataFrame, eps: float, block_size: int) -> DataFrame:
    """Per group (an uncut cell or a sub-cell): the eps-graph compressed to point -> local-root links.

    The group's first row also carries its raw eps-pair count and its pair comparisons; a group
    without links emits one self-link for them (dropped by connected components).
    """

    def links(table: pa.Table) -> pa.Table:
        ids = table.column(_ID).to_numpy()
        x = _arrow_matrix(table.column(EMBEDDING))
        out = eps_spanning_links(ids, x, eps, block_size)
        src, dst = (out.src, out.dst) if out.src.size else (ids[:1], ids[:1])
        raw, pairs = np.zeros(src.size, np.int64), np.zeros(src.size, np.int64)
        raw[0], pairs[0] = out.raw_edge_count, ids.size * (ids.size - 1) // 2
        return pa.table({_SRC: src, _DST: dst, _RAW: raw, _PAIRS: pairs})

    schema = f"{_SRC} long, {_DST} long, {_RAW} long, {_PAIRS} long"
    return assigned.groupBy(_GROUP).applyInArrow(links, schema)


def _driver_sample(points: DataFrame, n_rows: int, params: LocateUiParams) -> F32:
    """Unit embeddings of a seeded sample of at most ``kmeans_sample_rows`` rows (bounded, not data-sized)."""
    _, x = _to_numpy(_sample(points, n_rows, params.kmeans_sample_rows, params.seed + 1))
    return x


def cell_count(n_rows: int, params: LocateUiParams) -> int:
    """Coarse cells: the configured count, or enough that an average cell fills half of ``max_cell_rows``.

    Raises :class:`ConfigError` when the quantiser's driver sample holds fewer rows than cells
    (e.g. 1e9 rows with the defaults): k-means would silently train fewer cells than planned and
    the oversized cells could not be cut, so a run would go quadratic instead of failing.

    >>> from ers_spark.config import load_config
    >>> params = LocateUiParams.from_config(load_config(overrides=["locate_ui.nprobe=2", "locate_ui.max_cell_rows=8192"]))
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


def _plan_cells(points: DataFrame, n_rows: int, params: LocateUiParams) -> tuple[F32, CellPlan]:
    """Coarse quantiser (faiss spherical k-means on a driver sample) and the cut of each oversized cell.

    Cell sizes are estimated from the sample's own assignments (scaled to ``n_rows``), so no pass
    over the data is needed to find the oversized cells.
    """
    cells = cell_count(n_rows, params)  # first: an undersampled plan fails before the sample is drawn
    sample = _driver_sample(points, n_rows, params)
    centres = spherical_kmeans(sample, cells, params.seed, params.kmeans_max_iter)
    nearest = nearest_cells(sample, centres, params.nprobe)
    expected = expected_cell_rows(nearest, centres.shape[0], n_rows)
    plan = plan_cells(sample, nearest, expected, max_cell_rows=params.max_cell_rows, nprobe=params.nprobe,
                      seed=params.seed)
    if plan.sub_centres:
        log.info("locate-ui: %d of %d cells expected above %d rows (largest %.0f) cut into %d sub-cells",
                 len(plan.sub_centres), centres.shape[0], params.max_cell_rows, expected.max(),
                 plan.groups - centres.shape[0] + len(plan.sub_centres))
    return centres, plan


def _graph(
    spark: SparkSession, points: DataFrame, n_rows: int, eps: float, params: LocateUiParams
) -> UiResult:
    """Distributed approximate single linkage; members = the largest connected component."""
    centres, plan = _plan_cells(points, n_rows, params)
    plan_bc = spark.sparkContext.broadcast((centres, plan))
    assigned = _assign_cells(points, plan_bc, params.nprobe)
    links = _cell_links(assigned, eps, params.block_size).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        stats = links.agg(
            F.count(F.when(F.col(_SRC) != F.col(_DST), 1)).alias("n"),
            F.coalesce(F.sum(_RAW), F.lit(0)).alias("raw"),
            F.coalesce(F.sum(_PAIRS), F.lit(0)).alias("pairs"),
        ).first()
        n_links, raw_edges, pair_comparisons = int(stats["n"]), int(stats["raw"]), int(stats["pairs"])
        if params.connected_components == "graphframes":
            comps, rounds = connected_components_graphframes(spark, links), -1
        else:
            comps, rounds = connected_components_builtin(links, one_task_max_links=params.cc_one_task_max_links)
        comps = comps.persist(StorageLevel.MEMORY_AND_DISK)
        sizes_df = comps.groupBy(_ROOT).agg(F.count(F.lit(1)).alias("size"))
        top = sizes_df.orderBy(F.desc("size"), _ROOT).limit(5).collect()
        covered = comps.count()
    finally:
        links.unpersist()
    singletons = n_rows - covered
    top_sizes = sorted([int(r["size"]) for r in top] + [1] * min(5, singletons), reverse=True)[:5]
    counts = {
        "cells": int(centres.shape[0]),
        "cut_cells": len(plan.sub_centres),
        "groups": plan.groups,
        "links": n_links,
        "raw_edges": raw_edges,
        "pair_comparisons": pair_comparisons,
        "cc_rounds": rounds,
        "clustered_points": covered,
        "singletons": singletons,
    }
    _print_cluster_table(eps, top_sizes, n_rows)
    check_dominance(top_sizes, n_rows, params.dominance_ratio, params.min_share)
    ui_root = int(top[0][_ROOT])
    member_ids = comps.where(F.col(_ROOT) == ui_root).select(F.col(_NODE).alias(_ID))
    members = points.join(member_ids, _ID, "left_semi").select(IMAGE_ID, EMBEDDING)
    return UiResult(members=members, eps=eps, top_sizes=top_sizes, counts=counts)


def _print_cluster_table(eps: float, top_sizes: list[int], n_rows: int) -> None:
    log.info(f"locate-ui: eps={eps:.4g} on {n_rows} rows: top cluster sizes {top_sizes}")


# --------------------------------------------------------------------------- sample-hac method


def _sample_hac(spark: SparkSession, points: DataFrame, n_rows: int, eps: float, params: LocateUiParams) -> UiResult:
    """Exact scipy single linkage on a uniform sample; members = sampled rows of the largest cluster."""
    ids, x = _to_numpy(_sample(points, n_rows, params.sample_hac_rows, params.seed + 2))
    labels = exact_single_linkage(x, eps)
    sizes = cluster_sizes(labels)
    top_sizes = [int(s) for s in sizes[:5]]
    _print_cluster_table(eps, top_sizes, len(ids))
    ui = dominant_cluster(labels, params.dominance_ratio, params.min_share)
    mask = labels == ui
    member_ids = pa.array(ids, pa.string()).filter(pa.array(mask))
    members = spark.createDataFrame(pa.table({IMAGE_ID: member_ids}))
    return UiResult(
        members=members,
        eps=eps,
        top_sizes=top_sizes,
        counts={"sampled_rows": len(ids)},
        centroid_sum=x[mask].astype(np.float64).sum(axis=0),
        member_count=int(mask.sum()),
    )


# --------------------------------------------------------------------------- output


def _write(
    spark: SparkSession,
    cfg: ErsConfig,
    *,
    model: tuple[str, str],
    method: str,
    eps: float | None,
    members: DataFrame,
    member_count: int,
    top_sizes: list[int],
    centroid_sum: F64,
    input_version: int | None,
    settings: dict[str, Any] | None,
) -> tuple[str, F32, float]:
    """Append the UIC row and MERGE its members; members first, so a UIC row always has its members."""
    centroid = ui_centroid_from_sum(centroid_sum)
    # mean of (1 - cos(x, c)) over unit members = 1 - |sum| / n, since c = sum / |sum|
    mean_dist = float(max(0.0, 1.0 - np.linalg.norm(centroid_sum) / member_count))
    uic_id = uuid.uuid4().hex
    merge_insert_new(spark, cfg, UI_MEMBERS, members.select(F.lit(uic_id).alias(UIC_ID), IMAGE_ID))
    row = {
        UIC_ID: uic_id,
        MODEL_NAME: model[0],
        MODEL_VERSION: model[1],
        METHOD: method,
        EPS: None if eps is None else float(eps),
        MEMBER_COUNT: int(member_count),
        TOP_CLUSTER_SIZES: [int(s) for s in top_sizes],
        MEAN_MEMBER_DISTANCE: mean_dist,
        CENTROID: [float(v) for v in centroid],
        INPUT_VERSION: input_version,
        GAMMA: None,
        GAMMA_METHOD: None,
        CLUSTER_PARAMS: None if settings is None else settings_json(settings),
        GAMMA_PARAMS: None,
    }
    schema = StructType([f for f in UI_CENTROIDS.schema.fields if f.name != CREATED_AT])
    df = spark.createDataFrame([row], schema).withColumn(CREATED_AT, F.current_timestamp())
    df = df.select(*UI_CENTROIDS.columns)
    append(spark, cfg, UI_CENTROIDS, df)
    return uic_id, centroid, mean_dist


def _from_members(
    spark: SparkSession, cfg: ErsConfig, run: StageRun, emb: DataFrame, model: tuple[str, str], version: int | None
) -> dict:
    """Re-derive a stored UIC from its members with the current model's embeddings (no clustering)."""
    old_id = run.params["from_members"]
    if not table_exists(spark, cfg, UI_CENTROIDS):
        raise ErsUserError(f"--from-members {old_id}: no ui_centroids table yet; run `ers-spark locate-ui` first")
    old = read_table(spark, cfg, UI_CENTROIDS).where(F.col(UIC_ID) == old_id).select(EPS, METHOD).first()
    if old is None:
        raise ErsUserError(f"--from-members: unknown uic_id {old_id!r} (not in table 'ui_centroids')")
    stored = read_table(spark, cfg, UI_MEMBERS).where(F.col(UIC_ID) == old_id).select(IMAGE_ID).distinct()
    members = emb.join(stored, IMAGE_ID, "inner").select(IMAGE_ID, EMBEDDING).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        total, n = _member_sums(members)
        if n == 0:
            raise ErsUserError(
                f"--from-members {old_id}: none of its members has an embedding of model {model[0]} {model[1]}"
            )
        stored_count = stored.count()
        uic_id, _, mean_dist = _write(
            spark, cfg, model=model, method=f"from-members:{old_id}", eps=old[EPS], members=members,
            member_count=n, top_sizes=[n], centroid_sum=total, input_version=version, settings=None,
        )
    finally:
        members.unpersist()
    log.info(f"locate-ui: UIC {uic_id} from {n} of {stored_count} stored members of {old_id}")
    run.params.update(uic_id=uic_id, eps_used=old[EPS])
    run.counts = {"stored_members": stored_count, "members": n, "missing_embeddings": stored_count - n}
    return run.finish(spark, cfg, outputs=(UI_CENTROIDS, UI_MEMBERS))


# --------------------------------------------------------------------------- the stage


def cluster_settings(params: LocateUiParams) -> dict[str, Any]:
    """The settings that decide which cluster a run finds (not those that only change its speed)."""
    keys = ["method", "eps", "seed"]
    if params.eps is None:
        keys += ["eps_grid", "dominance_ratio", "min_share", "identity_min_size", "identity_tolerance", "grid_sample_rows"]
    if params.method == "graph":
        keys += ["kmeans_cells", "kmeans_sample_rows", "kmeans_max_iter", "nprobe", "max_cell_rows"]
    else:
        keys += ["sample_hac_rows"]
    return {k: getattr(params, k) for k in keys}


def _existing_uic(
    spark: SparkSession, cfg: ErsConfig, model: tuple[str, str], version: int | None, params: LocateUiParams
) -> tuple[Any, list[str]]:
    """(the newest UIC made from this very embeddings version with these very cluster settings or None,
    the settings that differ from those of the newest UIC of that version).

    A UIC made with other settings is not reused: the log names the settings that differ.
    """
    if version is None or not table_exists(spark, cfg, UI_CENTROIDS):
        return None, []
    rows = (
        read_table(spark, cfg, UI_CENTROIDS)
        .where(of_model(model) & (F.col(INPUT_VERSION) == version))
        .orderBy(F.col(CREATED_AT).desc())
        .select(UIC_ID, EPS, MEMBER_COUNT, CLUSTER_PARAMS)
        .limit(MAX_UICS_COMPARED)
        .collect()
    )
    settings = cluster_settings(params)
    for row in rows:
        if not changed_settings(row[CLUSTER_PARAMS], settings):
            return row, []
    changed = changed_settings(rows[0][CLUSTER_PARAMS], settings) if rows else []
    if rows:
        log.info("locate-ui: UIC %s was made from embeddings version %s with other settings (%s differ); "
                 "clustering again", rows[0][UIC_ID], version, ", ".join(changed))
    return None, changed


def run_locate_ui(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Find the unrecognizable-identity cluster and store its centroid (UIC) and members.

    Parameters
    ----------
    spark : SparkSession
        The project's session (:func:`ers_spark.lake.session.build_session`); its
        checkpoint dir is used by the connected-components loop.
    cfg : ErsConfig
        ``cfg.locate_ui`` holds the method and its parameters.

    Returns
    -------
    dict
        The StageRun record (also printed as one JSON line and appended to
        ``runs``); ``params`` holds :class:`LocateUiParams` plus the model
        used, the eps used and the new ``uic_id``.

    Raises
    ------
    ClusteringError
        No eps in the grid (or the fixed eps) gives a dominant cluster; the
        message carries the cluster sizes; nothing is written.
    ErsUserError
        Missing/empty embeddings table, unknown ``--from-members`` uic id,
        GraphFrames requested but not on the classpath.

    Examples
    --------
    >>> cfg = load_config(overrides=["locate_ui.eps=0.4"])    # doctest: +SKIP
    >>> rec = run_locate_ui(build_session(cfg, "locate-ui"), cfg)   # doctest: +SKIP
    >>> rec["counts"]["members"]                             # doctest: +SKIP
    1667
    """
    params = LocateUiParams.from_config(cfg)
    if params.method == "graph" and params.connected_components == "graphframes" and not params.from_members:
        require_graphframes(spark)
    run = StageRun(STAGE_NAME, params=asdict(params))
    version = table_version(spark, cfg, EMBEDDINGS)
    emb_all = read_table(spark, cfg, EMBEDDINGS, hint="run `ers-spark embed` first")
    name, model_version, seen = latest_model(emb_all)
    run.params.update(model_name=name, model_version=model_version, models_in_table=seen)
    if len(seen) > 1:
        log.warning("locate-ui: embeddings table holds %d models; using the latest, %s %s", len(seen), name, model_version)
    run.input_versions = {EMBEDDINGS.name: version}
    emb = emb_all.where(of_model((name, model_version)))
    if params.from_members:
        return _from_members(spark, cfg, run, emb, (name, model_version), version)
    if not cfg.locate_ui.recompute:
        existing, changed = _existing_uic(spark, cfg, (name, model_version), version, params)
        run.params.update(settings_changed=changed)
        if existing is not None:
            return _reuse(spark, cfg, run, existing, version)
    return _cluster_and_write(spark, cfg, run, emb, (name, model_version), version, params)


def _reuse(spark: SparkSession, cfg: ErsConfig, run: StageRun, existing: Any, version: int | None) -> dict:
    """Record a run that reuses a UIC made from the same embeddings with the same settings."""
    log.info(
        f"locate-ui: UIC {existing[UIC_ID]} was already computed from embeddings version {version} "
        f"with these settings; reusing it (locate_ui.recompute=true clusters again)"
    )
    run.params.update(uic_id=existing[UIC_ID], eps_used=existing[EPS], reused=True)
    run.counts = {"input_rows": 0, "members": int(existing[MEMBER_COUNT]), "reused": 1}
    return run.finish(spark, cfg, outputs=(UI_CENTROIDS, UI_MEMBERS))


def _choose_eps(points: DataFrame, n_rows: int, params: LocateUiParams) -> tuple[float, str]:
    """(eps, where it came from): the configured eps, else the grid rule on a seeded sample."""
    if params.eps is not None:
        return float(params.eps), "config"
    _, xs = _to_numpy(_sample(points, n_rows, params.grid_sample_rows, params.seed))
    choice = choose_eps(xs, params.eps_grid, params.dominance_ratio, params.min_share,
                        identity_min_size=params.identity_min_size, identity_tolerance=params.identity_tolerance)
    _print_size_table(choice.size_table)
    log.info(f"locate-ui: chose eps={choice.eps:.4g} ({choice.rule})")
    return choice.eps, f"grid on {xs.shape[0]} sampled rows: {choice.rule}"


def _cluster_and_write(spark: SparkSession, cfg: ErsConfig, run: StageRun, emb: DataFrame, model: tuple[str, str],
                       version: int | None, params: LocateUiParams) -> dict:
    """Cluster one model's embeddings, write the UIC and its members, finish the run record."""
    points = emb.select(F.monotonically_increasing_id().alias(_ID), IMAGE_ID, EMBEDDING).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    try:
        n_rows = points.count()
        eps, eps_source = _choose_eps(points, n_rows, params)
        cluster = _graph if params.method == "graph" else _sample_hac
        result = cluster(spark, points, n_rows, eps, params)
        members = result.members.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            if result.centroid_sum is not None and result.member_count is not None:
                total, n_members = result.centroid_sum, result.member_count
            else:
                total, n_members = _member_sums(members)
            uic_id, _, mean_dist = _write(
                spark, cfg, model=model, method=params.method, eps=eps,
                members=members.select(IMAGE_ID), member_count=n_members, top_sizes=result.top_sizes,
                centroid_sum=total, input_version=version, settings=cluster_settings(params),
            )
        finally:
            members.unpersist()
    finally:
        points.unpersist()
    log.info(
        f"locate-ui: UIC {uic_id}: {n_members} members ({params.method}, eps={eps:.4g}), "
        f"mean member distance {mean_dist:.4f}"
    )
    run.params.update(uic_id=uic_id, eps_used=eps, eps_source=eps_source, top_cluster_sizes=result.top_sizes)
    run.counts = {"input_rows": n_rows, "members": n_members, **result.counts}
    return run.finish(spark, cfg, outputs=(UI_CENTROIDS, UI_MEMBERS))
