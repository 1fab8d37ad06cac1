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
   sub-cells (:class:`~ers_spark.core.cells.CellPlan`). Every group then
   costs about ``max_cell_rows^2`` comparisons at most and the whole pass
   grows linearly with the rows;
3. inside each group :func:`~ers_spark.core.linkage.eps_spanning_links`
   finds all eps-pairs exactly (blocked matrix products) and emits only
   ``point -> local root`` links (at most one per point and group);
4. a global connected-components pass over those links (DataFrame
   large-star / small-star alternation, or GraphFrames) gives the clusters;
   points in no link are singletons;
5. the largest component must dominate (same rule as
   :func:`~ers_spark.core.ui_cluster.dominant_cluster`); its members' unit
   embeddings are summed by one Spark aggregate and normalised on the
   driver into the UIC.

Single linkage is exact inside every uncut cell; the approximations are
eps-pairs whose points share no cell or sub-cell (``nprobe`` at both levels).
:func:`~ers_spark.core.cells.capped_single_linkage` runs the same steps
in one process for tests and benchmarks.

``sample-hac`` runs the paper's exact scipy single linkage on a uniform sample
of at most ``sample_hac_rows`` rows; only the sampled rows can be members.

The distributed steps live in :mod:`ers_spark.distributed` (``cells``: 1-3, ``linkage``: 4,
``ui_cluster``: the methods and the dominance rule, ``ers``: the members' sum); this module chooses
eps, decides whether a stored UIC can be reused, and writes.

Nothing is written when no dominant cluster is found (:class:`ClusteringError`).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict
from typing import Any

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from ers_spark.config import ErsConfig, LocateUiConfig
from ers_spark.core.ers import ui_centroid_from_sum
from ers_spark.core.ui_cluster import choose_eps
from ers_spark.distributed.arrow import F32, F64, to_numpy
from ers_spark.distributed.cells import KMEANS_MAX_ITER, POINT_ID
from ers_spark.distributed.ers import member_sums
from ers_spark.distributed.linkage import require_graphframes
from ers_spark.distributed.sampling import uniform_sample
from ers_spark.distributed.ui_cluster import graph_linkage, sample_hac_linkage
from ers_spark.errors import ErsUserError
from ers_spark.lake.contracts import (
    CENTROID,
    CLUSTER_PARAMS,
    CREATED_AT,
    EMBEDDING,
    EMBEDDINGS,
    EPS,
    GAMMA,
    GAMMA_METHOD,
    GAMMA_PARAMS,
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

__all__ = ["run_locate_ui", "run_params", "cluster_settings"]

STAGE_NAME = "locate-ui"
log = logging.getLogger(__name__)
MAX_UICS_COMPARED = 50  # UICs of one embeddings version looked at for reuse (newest first)


def _log_size_table(table: list[tuple[float, list[int], int]]) -> None:
    """The whole eps grid at DEBUG (a line per eps; the run record keeps it as ``eps_size_table``)."""
    if log.isEnabledFor(logging.DEBUG):
        lines = "".join(f"\n  eps={eps:.4g}\ttop sizes {sizes}\t{n} identity-sized" for eps, sizes, n in table)
        log.debug("locate-ui: top cluster sizes per eps (exact single linkage on the eps sample)%s", lines)


def size_table_record(table: list[tuple[float, list[int], int]]) -> list[dict]:
    """The eps grid as the run record stores it: per eps, the top cluster sizes and the identity-sized count."""
    return [{"eps": float(eps), "top_sizes": [int(s) for s in sizes], "identity_sized": int(n)}
            for eps, sizes, n in table]


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
        total, n = member_sums(members)
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


def run_params(params: LocateUiConfig) -> dict[str, Any]:
    """The run record's params: ``locate_ui.*`` with the eps grid spelled out (in place of its start, stop and
    step) and the quantiser's k-means iterations; ``recompute`` only decides whether a UIC is reused."""
    grid = ("eps_grid_start", "eps_grid_stop", "eps_grid_step", "recompute")
    recorded = {k: v for k, v in asdict(params).items() if k not in grid}
    return {**recorded, "eps_grid": params.eps_grid, "kmeans_max_iter": KMEANS_MAX_ITER}


def cluster_settings(params: LocateUiConfig) -> dict[str, Any]:
    """The settings that decide which cluster a run finds (not those that only change its speed)."""
    keys = ["method", "eps", "seed"]
    if params.eps is None:
        keys += ["eps_grid", "dominance_ratio", "min_share", "identity_min_size", "identity_tolerance", "grid_sample_rows"]
    if params.method == "graph":
        keys += ["kmeans_cells", "max_top_cells", "kmeans_sample_rows", "kmeans_max_iter", "nprobe", "max_cell_rows"]
    else:
        keys += ["sample_hac_rows"]
    recorded = run_params(params)
    return {k: recorded[k] for k in keys}


def _existing_uic(
    spark: SparkSession, cfg: ErsConfig, model: tuple[str, str], version: int | None, params: LocateUiConfig
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
        The project's session (:func:`ers_spark.runtime.session.build_session`); its
        checkpoint dir is used by the connected-components loop.
    cfg : ErsConfig
        ``cfg.locate_ui`` holds the method and its parameters.

    Returns
    -------
    dict
        The StageRun record (also printed as one JSON line and appended to
        ``runs``); ``params`` holds :func:`run_params` plus the model
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
    params = cfg.locate_ui
    if params.method == "graph" and params.connected_components == "graphframes" and not params.from_members:
        require_graphframes(spark)
    run = StageRun(STAGE_NAME, params=run_params(params))
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
    if not params.recompute:
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


def _choose_eps(points: DataFrame, n_rows: int, params: LocateUiConfig) -> tuple[float, str, list[dict] | None]:
    """(eps, where it came from, the grid's size table): the configured eps, else the grid rule on a seeded sample.

    INFO says the chosen eps, its rule and the largest clusters there; the whole grid goes to DEBUG
    and to the run record.
    """
    if params.eps is not None:
        return float(params.eps), "config", None
    _, xs = to_numpy(uniform_sample(points, n_rows, params.grid_sample_rows, params.seed))
    choice = choose_eps(xs, params.eps_grid, params.dominance_ratio, params.min_share,
                        identity_min_size=params.identity_min_size, identity_tolerance=params.identity_tolerance)
    _log_size_table(choice.size_table)
    top_sizes = next(sizes for eps, sizes, _ in choice.size_table if eps == choice.eps)
    log.info(f"locate-ui: chose eps={choice.eps:.4g} on {xs.shape[0]} sampled rows ({choice.rule}); "
             f"largest clusters there {top_sizes}")
    return choice.eps, f"grid on {xs.shape[0]} sampled rows: {choice.rule}", size_table_record(choice.size_table)


def _cluster_and_write(spark: SparkSession, cfg: ErsConfig, run: StageRun, emb: DataFrame, model: tuple[str, str],
                       version: int | None, params: LocateUiConfig) -> dict:
    """Cluster one model's embeddings, write the UIC and its members, finish the run record."""
    points = emb.select(F.monotonically_increasing_id().alias(POINT_ID), IMAGE_ID, EMBEDDING).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    try:
        n_rows = points.count()
        eps, eps_source, size_table = _choose_eps(points, n_rows, params)
        cluster = graph_linkage if params.method == "graph" else sample_hac_linkage
        result = cluster(spark, points, n_rows, eps, params)
        members = result.members.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            if result.centroid_sum is not None and result.member_count is not None:
                total, n_members = result.centroid_sum, result.member_count
            else:
                total, n_members = member_sums(members)
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
    if size_table is not None:
        run.runtime["eps_size_table"] = size_table
    run.counts = {"input_rows": n_rows, "members": n_members, **result.counts}
    return run.finish(spark, cfg, outputs=(UI_CENTROIDS, UI_MEMBERS))
