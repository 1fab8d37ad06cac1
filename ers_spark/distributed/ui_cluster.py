"""The unrecognizable-identity cluster on Spark: the distributed side of :mod:`ers_spark.core.ui_cluster`
(dominance) and :func:`ers_spark.core.cells.capped_single_linkage`.

``graph``: cells (:mod:`ers_spark.distributed.cells`) give eps-links inside each group, connected components
(:mod:`ers_spark.distributed.linkage`) join them, and the largest component is the UI when it dominates.
``sample-hac``: exact scipy single linkage on a uniform sample; only the sampled rows can be members.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from ers_spark.config import LocateUiConfig
from ers_spark.core.linkage import exact_single_linkage
from ers_spark.core.ui_cluster import cluster_sizes, dominant_cluster
from ers_spark.distributed.arrow import F64, to_numpy
from ers_spark.distributed.cells import PAIR_COMPARISONS, POINT_ID, RAW_EDGES, assign_cells, cell_links, quantiser_plan
from ers_spark.distributed.linkage import (
    DST,
    NODE,
    ROOT,
    SRC,
    connected_components_builtin,
    connected_components_graphframes,
)
from ers_spark.distributed.sampling import uniform_sample
from ers_spark.errors import ClusteringError
from ers_spark.lake.contracts import EMBEDDING, IMAGE_ID

__all__ = ["UiResult", "check_dominance", "graph_linkage", "sample_hac_linkage"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UiResult:
    """What a clustering method found: members (a DataFrame of image_id), eps, sizes, counters."""

    members: DataFrame
    eps: float
    top_sizes: list[int]
    counts: dict[str, int]
    centroid_sum: F64 | None = None  # set when the members' sum is already known (sample-hac)
    member_count: int | None = None


def check_dominance(top_sizes: list[int], n_rows: int, ratio: float, min_share: float) -> None:
    """Raise :class:`ClusteringError` unless the largest cluster dominates.

    Same rule as :func:`ers_spark.core.ui_cluster.dominant_cluster`, but on cluster
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


def _print_cluster_table(eps: float, top_sizes: list[int], n_rows: int) -> None:
    log.info(f"locate-ui: eps={eps:.4g} on {n_rows} rows: top cluster sizes {top_sizes}")


def graph_linkage(
    spark: SparkSession, points: DataFrame, n_rows: int, eps: float, params: LocateUiConfig
) -> UiResult:
    """Distributed approximate single linkage; members = the largest connected component."""
    centres, plan = quantiser_plan(points, n_rows, params)
    plan_bc = spark.sparkContext.broadcast((centres, plan))
    assigned = assign_cells(points, plan_bc, params.nprobe)
    links = cell_links(assigned, eps, params.block_size).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        stats = links.agg(
            F.count(F.when(F.col(SRC) != F.col(DST), 1)).alias("n"),
            F.coalesce(F.sum(RAW_EDGES), F.lit(0)).alias("raw"),
            F.coalesce(F.sum(PAIR_COMPARISONS), F.lit(0)).alias("pairs"),
        ).first()
        n_links, raw_edges, pair_comparisons = int(stats["n"]), int(stats["raw"]), int(stats["pairs"])
        if params.connected_components == "graphframes":
            comps, rounds = connected_components_graphframes(spark, links), -1
        else:
            comps, rounds = connected_components_builtin(links, one_task_max_links=params.cc_one_task_max_links)
        comps = comps.persist(StorageLevel.MEMORY_AND_DISK)
        sizes_df = comps.groupBy(ROOT).agg(F.count(F.lit(1)).alias("size"))
        top = sizes_df.orderBy(F.desc("size"), ROOT).limit(5).collect()
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
    ui_root = int(top[0][ROOT])
    member_ids = comps.where(F.col(ROOT) == ui_root).select(F.col(NODE).alias(POINT_ID))
    members = points.join(member_ids, POINT_ID, "left_semi").select(IMAGE_ID, EMBEDDING)
    return UiResult(members=members, eps=eps, top_sizes=top_sizes, counts=counts)


def sample_hac_linkage(spark: SparkSession, points: DataFrame, n_rows: int, eps: float, params: LocateUiConfig) -> UiResult:
    """Exact scipy single linkage on a uniform sample; members = sampled rows of the largest cluster."""
    ids, x = to_numpy(uniform_sample(points, n_rows, params.sample_hac_rows, params.seed + 2))
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
