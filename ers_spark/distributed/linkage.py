"""Connected components of a Spark graph of ``(src, dst)`` int64 links: the distributed side of
:func:`ers_spark.core.linkage.links_to_labels`.

The builtin pass contracts the links to links between labels, then finishes them in one task with
scipy when few are left, else by large-star / small-star rounds (Kiveris et al., 2014); GraphFrames'
``connectedComponents`` is the alternative (``locate_ui.connected_components=graphframes``).
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from ers_spark.core.linkage import links_to_labels
from ers_spark.errors import ErsUserError

__all__ = ["connected_components_builtin", "connected_components_graphframes", "require_graphframes"]

log = logging.getLogger(__name__)
CC_MAX_ITER = 64  # large-star/small-star converges in O(log n) rounds; a guard, not a tuning knob

# column names of the graph (never written to a table)
SRC = "src"
DST = "dst"
NODE = "node"
ROOT = "root"


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
        links.select(F.greatest(SRC, DST).alias("x"), F.least(SRC, DST).alias("y"))
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
    real = links.select(SRC, DST).where(F.col(SRC) != F.col(DST))
    roles = real.select(F.col(SRC).alias(NODE), F.col(DST).alias("r"), F.lit(False).alias("is_root")).unionByName(
        real.select(F.col(DST).alias(NODE), F.col(DST).alias("r"), F.lit(True).alias("is_root"))
    )
    grouped = roles.groupBy(NODE).agg(
        F.min("r").alias("r"), F.max("is_root").alias("is_root"), F.collect_set("r").alias("roots")
    )
    return grouped.select(NODE, F.least(NODE, "r").alias("label"), "is_root", "roots")


def _label_links(labelled: DataFrame) -> DataFrame:
    """``(src, dst)`` links between labels: label -> each other root of a node, a root -> its own label."""
    across = labelled.select(F.col("label").alias(SRC), F.explode("roots").alias(DST)).where(
        (F.col(DST) != F.col(SRC))
    )
    return across.unionByName(
        labelled.where(F.col("is_root") & (F.col(NODE) != F.col("label"))).select(
            F.col(NODE).alias(SRC), F.col("label").alias(DST)
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
                                         names=[NODE, ROOT])

    return links.repartition(1).mapInArrow(components, f"{NODE} long, {ROOT} long")


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
        label_roots = stars.select(F.col("x").alias(NODE), F.col("y").alias(ROOT))
    out = (
        labelled.join(label_roots.withColumnRenamed(NODE, "label"), "label", "left")
        .select(NODE, F.coalesce(F.col(ROOT), F.col("label")).alias(ROOT))
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
    edges = links.where(F.col(SRC) != F.col(DST)).select(F.col(SRC).alias("src"), F.col(DST).alias("dst"))
    vertices = edges.select(F.col("src").alias("id")).unionByName(edges.select(F.col("dst").alias("id"))).distinct()
    cc = GraphFrame(vertices, edges).connectedComponents(checkpointInterval=2)
    return cc.select(F.col("id").alias(NODE), F.col("component").alias(ROOT))
