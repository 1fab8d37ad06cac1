"""The report stage (``ers-spark report``): reads the lake's tables on Spark and writes one self-contained HTML page.

It reads what the stages (and ``evaluate``, where it ran) wrote. Only aggregates and capped
samples reach the driver: histogram counts per bin, ``report.thumbnails_per_band`` crops per
ERS band (their bytes joined from ``crops`` after the limit; imported vectors have none and
show no picture), ``report.map_sample_rows`` embeddings for the map, quarantine counts per
reason, the newest run per stage, and for ``evaluate`` its newest run's metrics and curves
(thinned to ``report.curve_points`` each). The :mod:`ers_spark.report` package renders the
page from those plain values, without Spark. The report writes no table; it prints one JSON
line like the stages do.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from datetime import datetime, timezone
from functools import reduce

import numpy as np
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, LongType, StringType, StructField, StructType, TimestampType

from ers_spark.config import ErsConfig
from ers_spark.distributed.sampling import seeded_sample
from ers_spark.errors import ContractError
from ers_spark.lake.contracts import (
    ALL_TABLES, BYTES, CENTROID, CLEANED, CROPS, EMBEDDING, EMBEDDINGS, EPS, ERS, GAMMA, GAMMA_METHOD, IDENTITY,
    IMAGE_ID, IMPORTED_SOURCES, METHOD, MODEL_NAME, MODEL_VERSION, QUARANTINE, REASON, RECOGNIZABLE, RUNS, SCORED_AT, SCORES,
    SOURCE_PATH, STAGE, STARTED_AT, UI_CENTROIDS, UI_MEMBERS, UIC_ID, TableContract,
)
from ers_spark.lake.tables import image_labels, of_model, read_table, table_exists, table_version
from ers_spark.report.content import (
    BAND_ABOVE_GAMMA, BAND_BELOW_GAMMA, BAND_HIGHEST, BAND_LOWEST, BANDS, Band, Counts, Crop, Curve, EvalRun,
    Evaluation, Histogram, MapSample, Metric, QuarantineCount, ReportContent, RunSummary, Scoring,
)
from ers_spark.report.render import render_html
from ers_spark.runtime.cluster_paths import executors_on_other_hosts, is_local_path
from ers_spark.runtime.driver_files import checked_report_path, write_whole_text

STAGE_NAME = "report"
log = logging.getLogger(__name__)


def _contract(name: str, key: tuple[str, ...], *columns: tuple[str, object]) -> TableContract:
    return TableContract(name, StructType([StructField(n, t, True) for n, t in columns]), key=key)


# evaluate's tables, read by path when they exist (the evaluate stage owns and writes them)
EVAL_RUNS = _contract(
    "eval_runs", ("run_id",),
    ("run_id", StringType()), ("started_at", TimestampType()), ("model", StringType()), ("uic_id", StringType()),
    ("gamma", DoubleType()), ("params", StringType()), ("input_versions", StringType()), ("pairs_source", StringType()),
)
EVAL_METRICS = _contract(
    "eval_metrics", ("run_id", "protocol", "method", "metric", "operating_point"),
    ("run_id", StringType()), ("protocol", StringType()), ("method", StringType()), ("metric", StringType()),
    ("operating_point", StringType()), ("value", DoubleType()), ("count", LongType()),
)
EVAL_CURVES = _contract(
    "eval_curves", ("run_id", "curve", "method", "point_index"),
    ("run_id", StringType()), ("curve", StringType()), ("method", StringType()), ("x", DoubleType()),
    ("y", DoubleType()), ("point_index", IntegerType()),
)
EVAL_TABLES = (EVAL_RUNS, EVAL_METRICS, EVAL_CURVES)


def choose_scoring(spark: SparkSession, cfg: ErsConfig, scores: DataFrame) -> tuple[Scoring, list[float] | None]:
    """The newest scores' model, UIC and gamma (the score stage keeps one UIC per model in the table); its centroid."""
    newest = (
        scores.groupBy(MODEL_NAME, MODEL_VERSION, UIC_ID, GAMMA)
        .agg(F.max(SCORED_AT).alias("latest"))
        .orderBy(F.desc("latest"), UIC_ID)
        .first()
    )
    if newest is None:
        raise ContractError("the scores table is empty: run `ers-spark score` first")
    uic = read_table(spark, cfg, UI_CENTROIDS).where(F.col(UIC_ID) == newest[UIC_ID]).first()
    scoring = Scoring(
        model_name=newest[MODEL_NAME], model_version=newest[MODEL_VERSION], uic_id=newest[UIC_ID],
        gamma=float(newest[GAMMA]),
        gamma_method=uic[GAMMA_METHOD] if uic is not None else None,
        uic_method=uic[METHOD] if uic is not None else None,
        eps=uic[EPS] if uic is not None else None,
    )
    return scoring, list(uic[CENTROID]) if uic is not None else None


def score_totals(scores: DataFrame) -> dict[str, float]:
    """Rows, recognizable rows and the ERS extent of the report's scores, in one aggregate."""
    row = scores.agg(
        F.count(F.lit(1)).alias("rows"), F.sum(F.col(RECOGNIZABLE).cast("long")).alias("recognizable"),
        F.min(ERS).alias("lowest"), F.max(ERS).alias("highest"),
    ).first()
    return {key: (row[key] or 0) for key in ("rows", "recognizable", "lowest", "highest")}


def histogram_range(lowest: float, highest: float, gamma: float) -> tuple[float, float]:
    """The binned ERS range: the data's, widened to show gamma, never empty."""
    lo, hi = min(lowest, gamma), max(highest, gamma)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.005, hi + 0.005
    return lo, hi


def read_histogram(scores: DataFrame, gamma: float, bins: int, *, lowest: float, highest: float) -> Histogram:
    """ERS counts per bin and per recognizable flag, aggregated by Spark (bins x 2 rows reach the driver)."""
    lo, hi = histogram_range(float(lowest), float(highest), gamma)
    width = (hi - lo) / bins
    index = F.least(F.greatest(F.floor((F.col(ERS) - F.lit(lo)) / F.lit(width)), F.lit(0)), F.lit(bins - 1))
    counts = {True: np.zeros(bins, dtype=np.int64), False: np.zeros(bins, dtype=np.int64)}
    for row in scores.groupBy(index.cast("int").alias("bin"), RECOGNIZABLE).count().collect():
        counts[bool(row[RECOGNIZABLE])][row["bin"]] = row["count"]
    return Histogram(edges=np.linspace(lo, hi, bins + 1), recognizable=counts[True], unrecognizable=counts[False],
                     gamma=gamma)


def band_picks(scores: DataFrame, gamma: float, per_band: int) -> DataFrame:
    """(image_id, ers, recognizable, band) of the crops each band shows; each band is a top-k, never a full sort."""
    below = per_band // 2
    ranked = {
        BAND_LOWEST: scores.orderBy(F.asc(ERS), IMAGE_ID).limit(per_band),
        BAND_BELOW_GAMMA: scores.where(F.col(ERS) < gamma).orderBy(F.desc(ERS), IMAGE_ID).limit(below),
        BAND_ABOVE_GAMMA: scores.where(F.col(ERS) >= gamma).orderBy(F.asc(ERS), IMAGE_ID).limit(per_band - below),
        BAND_HIGHEST: scores.orderBy(F.desc(ERS), IMAGE_ID).limit(per_band),
    }
    parts = [df.select(IMAGE_ID, ERS, RECOGNIZABLE, F.lit(name).alias("band")) for name, df in ranked.items()]
    return reduce(DataFrame.unionByName, parts)


def read_bands(labels: DataFrame, crops: DataFrame | None, scores: DataFrame, gamma: float, per_band: int) -> list[Band]:
    """The images of every band with their labels and, where crops holds them, their bytes.

    Labels and bytes are joined after the limit (at most 4 x per_band ids); an imported vector has no bytes.
    """
    picked = band_picks(scores, gamma, per_band).collect()
    ids = scores.sparkSession.createDataFrame([(i,) for i in {r[IMAGE_ID] for r in picked}], f"{IMAGE_ID} string")
    named = {r[IMAGE_ID]: r for r in labels.join(F.broadcast(ids), IMAGE_ID).collect()}
    images = {} if crops is None else {
        r[IMAGE_ID]: bytes(r[BYTES]) for r in crops.select(IMAGE_ID, BYTES).join(F.broadcast(ids), IMAGE_ID).collect()
    }
    by_band: dict[str, list[Crop]] = {name: [] for name in BANDS}
    for row in picked:
        label = named.get(row[IMAGE_ID])
        by_band[row["band"]].append(
            Crop(image_id=row[IMAGE_ID], ers=float(row[ERS]), recognizable=bool(row[RECOGNIZABLE]),
                 identity=label[IDENTITY] if label else None, source_path=label[SOURCE_PATH] if label else None,
                 image_bytes=images.get(row[IMAGE_ID]))
        )
    return [Band(name, sorted(by_band[name], key=lambda c: (c.ers, c.image_id))) for name in BANDS]


def read_map_sample(
    embeddings: DataFrame, scores: DataFrame, members: DataFrame, centroid: list[float] | None, *,
    rows: int, seed: int, scored: int,
) -> MapSample:
    """A seeded sample of at most ``rows`` scored embeddings, with their flag and UI membership."""
    sample = seeded_sample(scores.select(IMAGE_ID, RECOGNIZABLE), IMAGE_ID, rows, seed, n_rows=scored)
    member_ids = members.select(IMAGE_ID, F.lit(True).alias("ui_member"))
    joined = (
        embeddings.select(IMAGE_ID, EMBEDDING).join(F.broadcast(sample), IMAGE_ID)
        .join(member_ids, IMAGE_ID, "left")
        .orderBy(IMAGE_ID)
        .collect()
    )
    dim = len(centroid) if centroid is not None else (len(joined[0][EMBEDDING]) if joined else 0)
    return MapSample(
        embeddings=np.array([r[EMBEDDING] for r in joined], dtype=np.float32).reshape(len(joined), dim),
        recognizable=np.array([bool(r[RECOGNIZABLE]) for r in joined], dtype=bool),
        ui_member=np.array([bool(r["ui_member"]) for r in joined], dtype=bool),
        centroid=np.asarray(centroid, dtype=np.float32) if centroid is not None else None,
        total_rows=scored,
    )


def read_counts(
    spark: SparkSession, cfg: ErsConfig, scoped: dict[str, DataFrame], scoring: Scoring, totals: dict[str, float]
) -> Counts:
    """Row counts of each table for this model and UIC; quarantine per stage and reason (all of it)."""
    scored, recognizable = int(totals["rows"]), int(totals["recognizable"])
    cleaned = None
    if table_exists(spark, cfg, CLEANED):
        cleaned = (
            read_table(spark, cfg, CLEANED)
            .where((F.col(UIC_ID) == scoring.uic_id) & (F.col(MODEL_NAME) == scoring.model_name)
                   & (F.col(MODEL_VERSION) == scoring.model_version))
            .count()
        )
    quarantine: list[QuarantineCount] = []
    if table_exists(spark, cfg, QUARANTINE):
        grouped = read_table(spark, cfg, QUARANTINE).groupBy(STAGE, REASON).count().orderBy(STAGE, REASON).collect()
        quarantine = [QuarantineCount(r[STAGE], r[REASON], int(r["count"])) for r in grouped]
    return Counts(
        crops=scoped["crops"].count() if scoped["crops"] is not None else 0, embeddings=scoped["embeddings"].count(), scored=scored,
        recognizable=recognizable, unrecognizable=scored - recognizable, ui_members=scoped["members"].count(),
        cleaned=cleaned, quarantine=quarantine,
    )


def read_runs(spark: SparkSession, cfg: ErsConfig) -> list[RunSummary]:
    """The newest run of each stage, in the order they started."""
    if not table_exists(spark, cfg, RUNS):
        return []
    newest_first = Window.partitionBy(STAGE).orderBy(F.desc(STARTED_AT))
    rows = (
        read_table(spark, cfg, RUNS).withColumn("_rank", F.row_number().over(newest_first))
        .where(F.col("_rank") == 1).orderBy(STARTED_AT).collect()
    )
    return [
        RunSummary(
            stage=r[STAGE], run_id=r["run_id"], started_at=r[STARTED_AT].strftime("%Y-%m-%d %H:%M:%S"),
            seconds=float(r["seconds"]),
            params=json.loads(r["params"]), input_versions=dict(r["input_versions"] or {}),
            output_versions=dict(r["output_versions"] or {}), counts=dict(r["counts"] or {}),
        )
        for r in rows
    ]


def _json_or_text(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {"text": text}
    return value if isinstance(value, dict) else {"value": value}


def thinned_curves(curves: DataFrame, points: int) -> DataFrame:
    """At most about ``points`` points per (curve, method), evenly strided, first and last kept."""
    group = Window.partitionBy("curve", "method")
    ordered = group.orderBy("point_index")
    numbered = curves.withColumn("_n", F.count(F.lit(1)).over(group)).withColumn("_i", F.row_number().over(ordered) - 1)
    stride = F.ceil(F.col("_n") / F.lit(points))
    return numbered.where((F.col("_i") % stride == 0) | (F.col("_i") == F.col("_n") - 1))


def read_evaluation(spark: SparkSession, cfg: ErsConfig) -> Evaluation | None:
    """The newest evaluate run with its metrics and (thinned) curves; None when evaluate never ran here."""
    present = [table_exists(spark, cfg, c) for c in EVAL_TABLES]
    if not any(present):
        return None
    if not all(present):
        missing = [c.name for c, here in zip(EVAL_TABLES, present) if not here]
        raise ContractError(f"evaluate's tables are incomplete under {cfg.storage.root}: {', '.join(missing)} missing")
    newest = read_table(spark, cfg, EVAL_RUNS).orderBy(F.desc("started_at"), F.desc("run_id")).first()
    if newest is None:
        return None
    run_id, cap = newest["run_id"], cfg.report.eval_metric_rows
    metric_rows = read_table(spark, cfg, EVAL_METRICS).where(F.col("run_id") == run_id).limit(cap + 1).collect()
    if len(metric_rows) > cap:
        log.warning("report: evaluate run %s has more than %d metric rows; showing %d (raise report.eval_metric_rows)",
                    run_id, cap, cap)
    curve_rows = (
        thinned_curves(read_table(spark, cfg, EVAL_CURVES).where(F.col("run_id") == run_id), cfg.report.curve_points)
        .orderBy("curve", "method", "point_index").collect()
    )
    return Evaluation(
        run=EvalRun(
            run_id=run_id, started_at=str(newest["started_at"]), model=newest["model"], uic_id=newest["uic_id"],
            gamma=newest["gamma"], params=_json_or_text(newest["params"]),
            input_versions=_json_or_text(newest["input_versions"]), pairs_source=newest["pairs_source"],
        ),
        metrics=[Metric(r["protocol"], r["method"], r["metric"], r["operating_point"] or "", r["value"], r["count"])
                 for r in metric_rows[:cap]],
        curves=_group_curves(curve_rows),
    )


def _group_curves(rows: list) -> list[Curve]:
    grouped: dict[tuple[str, str], list] = {}
    for row in rows:
        grouped.setdefault((row["curve"], row["method"]), []).append(row)
    return [
        Curve(curve, method, np.array([r["x"] for r in points], dtype=np.float64),
              np.array([r["y"] for r in points], dtype=np.float64))
        for (curve, method), points in grouped.items()
    ]


def table_versions(spark: SparkSession, cfg: ErsConfig) -> dict[str, int | None]:
    contracts = [*ALL_TABLES.values(), IMPORTED_SOURCES, *EVAL_TABLES]
    return {c.name: table_version(spark, cfg, c) for c in contracts}


def gather_report(spark: SparkSession, cfg: ErsConfig) -> ReportContent:
    """Everything the page shows, read from the lake (capped; see the module docstring)."""
    scores_all = read_table(spark, cfg, SCORES, hint="run `ers-spark score` first")
    scoring, centroid = choose_scoring(spark, cfg, scores_all)
    in_model = of_model((scoring.model_name, scoring.model_version))
    scoped = {
        "scores": scores_all.where(in_model & (F.col(UIC_ID) == scoring.uic_id)),
        "embeddings": read_table(spark, cfg, EMBEDDINGS).where(in_model),
        "members": read_table(spark, cfg, UI_MEMBERS).where(F.col(UIC_ID) == scoring.uic_id),
        "crops": read_table(spark, cfg, CROPS) if table_exists(spark, cfg, CROPS) else None,
        "labels": image_labels(spark, cfg),
    }
    totals = score_totals(scoped["scores"])
    counts = read_counts(spark, cfg, scoped, scoring, totals)
    params = cfg.report
    return ReportContent(
        title=params.title,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        storage_root=cfg.storage.table_path("").rstrip("/"),
        database=cfg.storage.database,
        scoring=scoring,
        runs=read_runs(spark, cfg),
        table_versions=table_versions(spark, cfg),
        histogram=read_histogram(scoped["scores"], scoring.gamma, params.histogram_bins,
                                 lowest=totals["lowest"], highest=totals["highest"]),
        bands=read_bands(scoped["labels"], scoped["crops"], scoped["scores"], scoring.gamma, params.thumbnails_per_band),
        map_sample=read_map_sample(
            scoped["embeddings"], scoped["scores"], scoped["members"], centroid,
            rows=params.map_sample_rows, seed=params.seed, scored=counts.scored,
        ),
        counts=counts,
        evaluation=read_evaluation(spark, cfg),
    )


def run_report(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Write the HTML report; print one JSON line (path, table versions read, what the page shows)."""
    started = time.perf_counter()
    path = checked_report_path(spark, cfg)  # a path the cluster cannot use fails before any table is read
    content = gather_report(spark, cfg)
    params = cfg.report
    html = render_html(content, thumbnail_px=params.thumbnail_px, thumbnails_per_band=params.thumbnails_per_band)
    path = write_whole_text(spark, path, html)  # whole or not at all: a browser never opens half a report
    evaluation = content.evaluation
    record = {
        "stage": STAGE_NAME,
        "path": str(path),
        "params": asdict(cfg.report),
        "input_versions": content.table_versions,
        "counts": {
            "thumbnails": sum(len(b.crops) for b in content.bands),
            "map_points": int(len(content.map_sample.embeddings)),
            "eval_metrics": len(evaluation.metrics) if evaluation else 0,
            "eval_curves": len(evaluation.curves) if evaluation else 0,
            "bytes": len(html.encode("utf-8")),
        },
        "seconds": round(time.perf_counter() - started, 3),
    }
    print(json.dumps(record, sort_keys=True, default=str), flush=True)
    where = "on the driver host" if is_local_path(path) and executors_on_other_hosts(spark.sparkContext.master) else ""
    log.info("report: wrote %s %s(%.0f KiB)", path, where and where + " ", record["counts"]["bytes"] / 1024)
    return record
