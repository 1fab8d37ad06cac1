"""Evaluate stage: what ERS does for recognition, measured on Spark and written to ``eval_*`` tables.

Reads ``embeddings`` (one model), ``scores`` (one UIC: ``score.uic_id`` or the
newest) and identities (``crops`` or ``imported_sources``, through
:func:`ers_spark.lake.tables.image_labels`). Comparisons are built and scored on Spark:
genuine pairs within identities (capped per identity, seeded), impostor pairs
by seeded random blocking (a hash bucket per image, pairs within a bucket; never
a full cross join), or the pairs of a user file. Only the comparison scores (a
few floats per pair, capped by config) reach the driver, where the pure
functions of :mod:`ers_spark.core.metrics` compute:

* 1:1 verification: TAR/FRR at each supported FAR, DET curves, the unsure
  rule both ways (generalised ISO/IEC 19795-1 rates and sure pairs only);
* 1:N open-set identification: FNIR at FPIR with and without ERS rejection;
* set-based verification: templates of k images pooled with uniform / ERS /
  ERS^2 / softmax / top-k weights;
* EDC (ISO/IEC 29794-1): FNMR as the lowest-quality genuine pairs are
  discarded, by ERS, the raw feature norm and a random order.

gamma is calibrated as the paper does, on a seeded share of the identities,
and every gamma-dependent rate is measured on the other identities.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

from ers_spark.config import ErsConfig, EvaluateConfig
from ers_spark.core import metrics
from ers_spark.core.ers import threshold_at_far
from ers_spark.errors import ContractError, ErsUserError
from ers_spark.lake.contracts import (
    EMBEDDING,
    EMBEDDINGS,
    ERS,
    EVAL_CURVES,
    EVAL_METRICS,
    EVAL_RUNS,
    IDENTITY,
    IMAGE_ID,
    LABEL_TABLES,
    RAW_NORM,
    SCORES,
    SOURCE_PATH,
    UI_CENTROIDS,
    UIC_ID,
)
from ers_spark.lake.tables import StageRun, append, image_labels, latest_model, of_model, read_table, table_version
from ers_spark.stages.score import select_centroid

STAGE_NAME = "evaluate"
log = logging.getLogger(__name__)

# working columns
ITEM = "item"
A, B = "a", "b"
SAME = "same"
SIM = "sim"
CALIBRATION = "calibration"
NONMATED = "nonmated"
TEMPLATE = "template"
VECTOR = "vector"
PAIRS_COLUMNS = ("left", "right", "label")


@dataclass(frozen=True)
class EvaluateParams:
    """``evaluate.*`` plus the UIC chosen by ``score.uic_id``."""

    cfg: EvaluateConfig
    uic_id: str | None

    @classmethod
    def from_config(cls, cfg: ErsConfig) -> "EvaluateParams":
        return cls(cfg.evaluate, cfg.score.uic_id)


@dataclass
class EvalResults:
    """The rows of eval_metrics and eval_curves, gathered as the protocols run."""

    metrics: list[tuple[str, str, str, str, float | None, int | None]] = field(default_factory=list)
    curves: list[tuple[str, str, float, float, int]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def metric(self, protocol: str, method: str, metric: str, point: str, value: float | None, count: int | None) -> None:
        finite = value is not None and np.isfinite(value)
        self.metrics.append((protocol, method, metric, point, float(value) if finite else None,
                             int(count) if count is not None else None))

    def point(self, protocol: str, method: str, rate: str, target: float, op: metrics.OperatingPoint) -> None:
        """accept / reject / false-accept rates and threshold of one operating point."""
        label = metrics.operating_point_label(rate, target)
        accept, reject = ("tar", "frr") if rate == "far" else ("tpir", "fnir")
        self.metric(protocol, method, accept, label, op.accept_rate, op.n_positive)
        self.metric(protocol, method, reject, label, op.reject_rate, op.n_positive)
        self.metric(protocol, method, rate, label, op.false_accept_rate, op.n_negative)
        self.metric(protocol, method, "threshold", label, op.threshold, None)

    def curve(self, curve: str, method: str, xs: np.ndarray, ys: np.ndarray) -> None:
        self.curves.extend((curve, method, float(x), float(y), i) for i, (x, y) in enumerate(zip(xs, ys)))


def dot(left: str, right: str) -> F.Column:
    """Inner product of two array columns, evaluated by Spark (unit embeddings: cosine similarity)."""
    products = F.zip_with(F.col(left), F.col(right), lambda x, y: x * y)
    return F.aggregate(products, F.lit(0.0), lambda acc, x: acc + x).cast("double")


def seeded_hash(seed: int, *columns: str | F.Column) -> F.Column:
    return F.xxhash64(F.lit(seed), *[F.col(c) if isinstance(c, str) else c for c in columns])


# --------------------------------------------------------------------------- inputs


def load_images(spark: SparkSession, cfg: ErsConfig, params: EvaluateParams) -> tuple[DataFrame, dict[str, Any]]:
    """One row per scored image of the model + UIC: embedding, ERS, raw norm, identity, source path."""
    embeddings_all = read_table(spark, cfg, EMBEDDINGS, hint="run `ers-spark embed` first")
    model = latest_model(embeddings_all)[:2]
    centroid = select_centroid(spark, cfg, model, params.uic_id)
    in_model = of_model(model)
    scores = read_table(spark, cfg, SCORES, hint="run `ers-spark score` first").where(
        in_model & (F.col(UIC_ID) == centroid.uic_id)
    )
    if scores.isEmpty():
        raise ContractError(
            f"no scores for UIC {centroid.uic_id} of model {model[0]} {model[1]}: run `ers-spark score` first"
        )
    labels = image_labels(spark, cfg).select(IMAGE_ID, IDENTITY, SOURCE_PATH)
    images = (
        embeddings_all.where(in_model).select(IMAGE_ID, EMBEDDING, RAW_NORM)
        .join(scores.select(IMAGE_ID, ERS), IMAGE_ID)
        .join(labels, IMAGE_ID, "left")
    )
    read = (EMBEDDINGS, SCORES, *LABEL_TABLES, UI_CENTROIDS)
    context = {
        "model": f"{model[0]} {model[1]}",
        "uic_id": centroid.uic_id,
        "input_versions": {c.name: table_version(spark, cfg, c) for c in read},
    }
    return images, context


def identity_roles(images: DataFrame, params: EvaluateConfig) -> DataFrame:
    """Per identity: calibration (gamma is chosen on it) or evaluation; some evaluation ones left out of the gallery.

    Identities are ranked by a seeded hash (one row per identity in one window: identities, not images);
    the first ``calibration_share`` are calibration, the next ``nonmated_identity_share`` of the rest
    are the 1:N non-mated identities.
    """
    ids = images.where(F.col(IDENTITY).isNotNull()).select(IDENTITY).distinct()
    n_ids = ids.count()
    n_cal = int(round(params.calibration_share * n_ids))
    n_nonmated = int(round(params.nonmated_identity_share * (n_ids - n_cal)))
    rank = F.row_number().over(Window.orderBy(seeded_hash(params.seed, F.lit("split"), IDENTITY), IDENTITY))
    return ids.withColumn("_rank", rank).select(
        IDENTITY,
        (F.col("_rank") <= n_cal).alias(CALIBRATION),
        ((F.col("_rank") > n_cal) & (F.col("_rank") <= n_cal + n_nonmated)).alias(NONMATED),
    )


# --------------------------------------------------------------------------- pairs


def genuine_pairs(items: DataFrame, *, per_identity: int, max_total: int, seed: int) -> DataFrame:
    """Pairs ``(a, b)`` of items of the same identity: all of them up to ``per_identity`` per identity, else a seeded draw.

    Only the first ``m`` items of an identity in seeded order take part, with ``m(m-1)/2 ~ 4 per_identity``,
    so the within-identity join costs O(per_identity) per identity whatever its size.
    """
    m = int(np.ceil(np.sqrt(8 * per_identity))) + 1
    order = Window.partitionBy(IDENTITY).orderBy(seeded_hash(seed, F.lit("genuine"), ITEM), ITEM)
    ranked = items.select(ITEM, IDENTITY).withColumn("_r", F.row_number().over(order)).where(F.col("_r") <= m)
    x, y = ranked.alias("x"), ranked.alias("y")
    pairs = x.join(y, (F.col("x." + IDENTITY) == F.col("y." + IDENTITY)) & (F.col("x._r") < F.col("y._r"))).select(
        F.least(F.col("x." + ITEM), F.col("y." + ITEM)).alias(A),
        F.greatest(F.col("x." + ITEM), F.col("y." + ITEM)).alias(B),
        F.col("x." + IDENTITY).alias(IDENTITY),
    )
    pick = Window.partitionBy(IDENTITY).orderBy(seeded_hash(seed, F.lit("pick"), A, B), A, B)
    capped = pairs.withColumn("_k", F.row_number().over(pick)).where(F.col("_k") <= per_identity)
    return capped.orderBy(seeded_hash(seed, F.lit("total"), A, B), A, B).limit(max_total).select(A, B)


def impostor_pairs(items: DataFrame, *, count: int, seed: int) -> DataFrame:
    """About ``count`` pairs of items of different identities, by seeded random blocking.

    Each item falls in one of ``B`` hash buckets; pairs are formed inside buckets only, with ``B`` chosen so
    that about twice ``count`` impostor pairs arise, then ``count`` are kept in seeded order. Every impostor
    pair is equally likely; a small table (B = 1) gives all of its impostor pairs.
    """
    stats = items.groupBy(IDENTITY).count().agg(
        F.sum("count").alias("n"), F.sum(F.col("count") * F.col("count")).alias("sq")
    ).first()
    n, sq = int(stats["n"] or 0), int(stats["sq"] or 0)
    total = (n * n - sq) // 2
    buckets = max(1, total // (2 * count))
    bucketed = items.select(ITEM, IDENTITY, F.pmod(seeded_hash(seed, F.lit("bucket"), ITEM), F.lit(buckets)).alias("_b"))
    x, y = bucketed.alias("x"), bucketed.alias("y")
    pairs = x.join(
        y,
        (F.col("x._b") == F.col("y._b")) & (F.col("x." + ITEM) < F.col("y." + ITEM))
        & (F.col("x." + IDENTITY) != F.col("y." + IDENTITY)),
    ).select(F.col("x." + ITEM).alias(A), F.col("y." + ITEM).alias(B))
    return pairs.orderBy(seeded_hash(seed, F.lit("impostor"), A, B), A, B).limit(count)


def read_pairs_file(spark: SparkSession, path: str) -> DataFrame:
    """A user's pairs: Parquet or CSV (by extension) with columns left, right (image_id or source_path) and label."""
    reader = spark.read.option("header", True) if path.lower().endswith(".csv") else spark.read
    try:
        df = reader.csv(path) if path.lower().endswith(".csv") else reader.parquet(path)
    except Exception as exc:  # noqa: BLE001 - missing path or unreadable file: one line for the user
        raise ContractError(f"evaluate.pairs_path {path!r} cannot be read: {str(exc).splitlines()[0][:200]}") from None
    missing = [c for c in PAIRS_COLUMNS if c not in df.columns]
    if missing:
        raise ContractError(
            f"pairs file {path} lacks column(s) {', '.join(missing)}; expected left, right (image_id or "
            "source_path) and label (1 or true = same person)"
        )
    label = F.lower(F.trim(F.col("label").cast("string")))
    same = F.when(label.isin("1", "1.0", "true"), True).when(label.isin("0", "0.0", "false"), False)
    pairs = df.select(F.col("left").cast("string"), F.col("right").cast("string"), same.alias(SAME))
    bad = pairs.where(F.col(SAME).isNull()).count()
    if bad:
        raise ContractError(f"pairs file {path}: {bad} row(s) have a label other than 1/0 or true/false")
    return pairs


def resolve_pair_file(pairs: DataFrame, images: DataFrame) -> tuple[DataFrame, int]:
    """Map each side to an image_id (matching image_id first, else source_path); count pairs left unresolved."""
    by_id = images.select(F.col(IMAGE_ID).alias("_key"), F.col(IMAGE_ID).alias("_id"), F.lit(0).alias("_pref"))
    by_path = images.where(F.col(SOURCE_PATH).isNotNull()).select(
        F.col(SOURCE_PATH).alias("_key"), F.col(IMAGE_ID).alias("_id"), F.lit(1).alias("_pref")
    )
    best = Window.partitionBy("_key").orderBy("_pref", "_id")
    lookup = by_id.unionByName(by_path).withColumn("_n", F.row_number().over(best)).where(F.col("_n") == 1)
    left, right = lookup.alias("l"), lookup.alias("r")
    resolved = (
        pairs.join(left, F.col("left") == F.col("l._key"), "left")
        .join(right, F.col("right") == F.col("r._key"), "left")
        .select(F.col("l._id").alias(A), F.col("r._id").alias(B), SAME)
    )
    resolved = resolved.persist()
    unresolved = resolved.where(F.col(A).isNull() | F.col(B).isNull()).count()
    return resolved.where(F.col(A).isNotNull() & F.col(B).isNotNull()), unresolved


def score_pairs(pairs: DataFrame, images: DataFrame) -> pd.DataFrame:
    """Join both sides' embeddings on Spark, dot them there, and collect only the per-pair scalars."""
    side = images.select(IMAGE_ID, EMBEDDING, ERS, RAW_NORM, IDENTITY, CALIBRATION)
    sa = side.select(*[F.col(c).alias(f"{c}_a") for c in side.columns])
    sb = side.select(*[F.col(c).alias(f"{c}_b") for c in side.columns])
    joined = pairs.join(sa, F.col(A) == F.col(f"{IMAGE_ID}_a")).join(sb, F.col(B) == F.col(f"{IMAGE_ID}_b"))
    scored = joined.select(
        A, B, SAME, dot(f"{EMBEDDING}_a", f"{EMBEDDING}_b").alias(SIM),
        *[f"{c}_{s}" for c in (ERS, RAW_NORM, IDENTITY, CALIBRATION) for s in ("a", "b")],
    )
    return scored.toPandas().sort_values([A, B], kind="stable").reset_index(drop=True)


def build_pairs(spark: SparkSession, images: DataFrame, params: EvaluateConfig, counts: dict[str, int]) -> pd.DataFrame:
    """The verification comparisons: the user's pairs file, or pairs built from identities."""
    if params.pairs_path:
        pairs, unresolved = resolve_pair_file(read_pairs_file(spark, params.pairs_path), images)
        counts["pairs_unresolved"] = unresolved
        if unresolved:
            log.warning("evaluate: %d pair(s) of %s name images that are not scored; left out", unresolved,
                        params.pairs_path)
    else:
        items = images.where(F.col(IDENTITY).isNotNull()).select(F.col(IMAGE_ID).alias(ITEM), IDENTITY)
        genuine = genuine_pairs(items, per_identity=params.genuine_pairs_per_identity,
                                max_total=params.max_genuine_pairs, seed=params.seed)
        impostor = impostor_pairs(items, count=params.impostor_pairs, seed=params.seed)
        pairs = genuine.withColumn(SAME, F.lit(True)).unionByName(impostor.withColumn(SAME, F.lit(False)))
    scored = score_pairs(pairs, images)
    counts["genuine_pairs"] = int(scored[SAME].sum())
    counts["impostor_pairs"] = int((~scored[SAME]).sum())
    if counts["genuine_pairs"] == 0 or counts["impostor_pairs"] == 0:
        raise ErsUserError(
            f"evaluate needs genuine and impostor pairs, got {counts['genuine_pairs']} and {counts['impostor_pairs']}: "
            "label the crops (or the imported vectors) with identities (2+ images for 2+ identities) or pass "
            "evaluate.pairs_path"
        )
    return scored


# --------------------------------------------------------------------------- protocols on the driver (pure math)


def calibration_masks(pairs: pd.DataFrame, params: EvaluateConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """(calibration, evaluation) pair masks: by identity when both sides carry one, else by a seeded pair split."""
    cal_a, cal_b = pairs[f"{CALIBRATION}_a"], pairs[f"{CALIBRATION}_b"]
    if cal_a.notna().all() and cal_b.notna().all():
        a, b = cal_a.to_numpy(bool), cal_b.to_numpy(bool)
        return a & b, ~a & ~b, "identities"
    rng = np.random.default_rng(params.seed)
    cal = rng.random(len(pairs)) < params.calibration_share
    return cal, ~cal, "pairs"


def verification_protocol(pairs: pd.DataFrame, params: EvaluateConfig, results: EvalResults) -> float:
    """gamma on the calibration pairs, then TAR/FRR at each FAR on the evaluation pairs, three ways; returns gamma."""
    cal, ev, split = calibration_masks(pairs, params)
    sim, same = pairs[SIM].to_numpy(float), pairs[SAME].to_numpy(bool)
    q = np.minimum(pairs[f"{ERS}_a"].to_numpy(float), pairs[f"{ERS}_b"].to_numpy(float))
    calibration = metrics.calibrate_gamma_split(sim, q, q, same, cal, params.target_far)
    gamma = calibration.gamma
    results.notes.update(calibration_split=split, gamma_calibration_frr=calibration.frr)
    results.metric("verification", "calibration", "frr", metrics.operating_point_label("far", params.target_far),
                   calibration.frr, int((cal & same).sum()))
    gen, imp = sim[ev & same], sim[ev & ~same]
    gen_u, imp_u = q[ev & same] < gamma, q[ev & ~same] < gamma
    if gen.size == 0 or imp.size == 0:
        raise ErsUserError(f"the evaluation identities have {gen.size} genuine and {imp.size} impostor pairs; "
                           "lower evaluate.calibration_share or add identities")
    supported, unsupported = metrics.supported_rates(imp.size, params.fars)
    results.notes["verification_fars_unsupported"] = unsupported
    if unsupported:
        log.info("evaluate: %d impostor pairs support FAR down to %s only", imp.size, min(supported, default=None))
    for far in supported:
        results.point("verification", "baseline", "far", far, metrics.verification_at_far(gen, imp, far))
        results.point("verification", "unsure_as_reject", "far", far,
                      metrics.unsure_as_reject_at_far(gen, gen_u, imp, imp_u, far))
        if metrics.supported_rates(int((~imp_u).sum()), [far])[0] and (~gen_u).any():
            results.point("verification", "sure_only", "far", far, metrics.sure_only_at_far(gen, gen_u, imp, imp_u, far))
    gamma_label = "gamma"
    results.metric("verification", "unsure", "unsure_rate_genuine", gamma_label, float(gen_u.mean()), gen.size)
    results.metric("verification", "unsure", "unsure_rate_impostor", gamma_label, float(imp_u.mean()), imp.size)
    results.metric("verification", "unsure", "unsure_rate", gamma_label,
                   float(np.r_[gen_u, imp_u].mean()), gen.size + imp.size)
    results.metric("verification", "unsure", "gamma", gamma_label, gamma, None)
    results.curve("det", "baseline", *metrics.det_curve(gen, imp, params.det_points))
    results.curve("det", "unsure_as_reject", *metrics.det_curve(metrics.unsure_scores(gen, gen_u),
                                                                metrics.unsure_scores(imp, imp_u), params.det_points))
    if (~gen_u).any() and (~imp_u).any():
        results.curve("det", "sure_only", *metrics.det_curve(gen[~gen_u], imp[~imp_u], params.det_points))
    return gamma


def edc_protocol(pairs: pd.DataFrame, params: EvaluateConfig, results: EvalResults) -> None:
    """EDC on all pairs: threshold at FMR = edc_fmr, genuine pairs discarded by min(quality) of ERS, norm, random."""
    sim, same = pairs[SIM].to_numpy(float), pairs[SAME].to_numpy(bool)
    threshold = threshold_at_far(sim[~same], params.edc_fmr)
    gen = sim[same]
    fractions = np.linspace(0.0, params.edc_max_discard, params.edc_steps + 1)
    rng = np.random.default_rng(params.seed)
    qualities = {
        "ers": np.minimum(pairs[f"{ERS}_a"], pairs[f"{ERS}_b"]).to_numpy(float)[same],
        "norm": np.minimum(pairs[f"{RAW_NORM}_a"], pairs[f"{RAW_NORM}_b"]).to_numpy(float)[same],
        "random": rng.random(gen.size),
    }
    point = f"discard<={params.edc_max_discard:g}"
    results.metric("edc", "all", "threshold", metrics.operating_point_label("fmr", params.edc_fmr), threshold, None)
    for method, quality in qualities.items():
        fnmr = metrics.edc_curve(gen, quality, threshold, fractions)
        results.curve("edc", method, fractions, fnmr)
        results.metric("edc", method, "pauc", point, metrics.partial_area(fractions, fnmr), gen.size)
        results.metric("edc", method, "fnmr", "discard=0", float(fnmr[0]), gen.size)


# --------------------------------------------------------------------------- 1:N open-set identification


def identification_probes(images: DataFrame, params: EvaluateConfig) -> pd.DataFrame:
    """Per probe of the evaluation identities: mated?, rank-1 mate score (null if not first), top score, ERS.

    Gallery: one enrolment image per non-left-out identity (highest ERS, or seeded random). Probes x gallery
    is a broadcast cross join on Spark; only the per-probe aggregates come back, at most ``max_probes``.
    """
    ev = images.where(F.col(IDENTITY).isNotNull() & ~F.col(CALIBRATION))
    key = (F.col(ERS).desc(),) if params.enrolment == "best_ers" else (seeded_hash(params.seed, F.lit("enrol"), IMAGE_ID),)
    enrol_rank = F.row_number().over(Window.partitionBy(IDENTITY).orderBy(*key, IMAGE_ID))
    ev = ev.withColumn("_enrol", ~F.col(NONMATED) & (enrol_rank == 1))
    gallery = ev.where("_enrol").select(F.col(IDENTITY).alias("g_identity"), F.col(EMBEDDING).alias("g_embedding"))
    probes = ev.where(~F.col("_enrol")).orderBy(seeded_hash(params.seed, F.lit("probe"), IMAGE_ID), IMAGE_ID)
    probes = probes.limit(params.max_probes).select(IMAGE_ID, IDENTITY, EMBEDDING, ERS, NONMATED)
    compared = probes.crossJoin(F.broadcast(gallery)).withColumn(SIM, dot(EMBEDDING, "g_embedding"))
    per_probe = compared.groupBy(IMAGE_ID, IDENTITY, ERS, NONMATED).agg(
        F.max(SIM).alias("top"),
        F.max(F.when(F.col("g_identity") == F.col(IDENTITY), F.col(SIM))).alias("mate"),
    )
    rank1 = F.when(F.col("mate") >= F.col("top"), F.col("mate"))
    return per_probe.select(IMAGE_ID, NONMATED, rank1.alias("mate_rank1"), "top", ERS).toPandas().sort_values(IMAGE_ID)


def identification_protocol(probes: pd.DataFrame, gamma: float, params: EvaluateConfig, results: EvalResults) -> None:
    """FNIR at each supported FPIR, without and with rejection of probes whose ERS < gamma."""
    nonmated = probes[NONMATED].to_numpy(bool)
    mate = probes["mate_rank1"].to_numpy(float, na_value=-np.inf)[~nonmated]
    top = probes["top"].to_numpy(float)[nonmated]
    rejected = probes[ERS].to_numpy(float) < gamma
    if mate.size == 0 or top.size == 0:
        results.notes["identification"] = f"skipped: {mate.size} mated and {top.size} non-mated probes"
        log.warning("evaluate: 1:N skipped (%d mated, %d non-mated probes)", mate.size, top.size)
        return
    supported, unsupported = metrics.supported_rates(top.size, params.fpirs)
    results.notes["identification_fpirs_unsupported"] = unsupported
    for fpir in supported:
        results.point("identification", "baseline", "fpir", fpir, metrics.fnir_at_fpir(mate, top, fpir))
        results.point("identification", "ers_rejection", "fpir", fpir, metrics.fnir_at_fpir(
            mate, top, fpir, mated_rejected=rejected[~nonmated], nonmated_rejected=rejected[nonmated]))
    results.metric("identification", "ers_rejection", "rejected_rate", "mated", float(rejected[~nonmated].mean()),
                   mate.size)
    results.metric("identification", "ers_rejection", "rejected_rate", "nonmated", float(rejected[nonmated].mean()),
                   top.size)


# --------------------------------------------------------------------------- set-based (template) verification


def pooled_templates(images: DataFrame, params: EvaluateConfig) -> DataFrame:
    """Seeded templates of ``template_size`` images per identity, pooled with every weighting (pandas UDF per template)."""
    k = params.template_size
    order = Window.partitionBy(IDENTITY).orderBy(seeded_hash(params.seed, F.lit("set"), IMAGE_ID), IMAGE_ID)
    members = (
        images.where(F.col(IDENTITY).isNotNull())
        .withColumn("_t", F.floor((F.row_number().over(order) - 1) / k))
        .withColumn(TEMPLATE, F.concat_ws("#", F.col(IDENTITY), F.col("_t").cast("string")))
        .withColumn("_size", F.count(F.lit(1)).over(Window.partitionBy(TEMPLATE)))
        .where(F.col("_size") == k)
        .select(TEMPLATE, IDENTITY, EMBEDDING, ERS)
    )
    temperature, top_k = params.softmax_temperature, params.top_k

    def pool(group: pd.DataFrame) -> pd.DataFrame:
        emb = np.stack(group[EMBEDDING].to_numpy())
        ers = group[ERS].to_numpy(float)
        vectors = [metrics.pool_template(emb, ers, m, temperature=temperature, top_k=top_k).astype(np.float32).tolist()
                   for m in metrics.POOLING_METHODS]
        n = len(metrics.POOLING_METHODS)
        return pd.DataFrame({TEMPLATE: [group[TEMPLATE].iloc[0]] * n, IDENTITY: [group[IDENTITY].iloc[0]] * n,
                             "method": list(metrics.POOLING_METHODS), VECTOR: vectors})

    schema = StructType([StructField(TEMPLATE, StringType()), StructField(IDENTITY, StringType()),
                         StructField("method", StringType()), StructField(VECTOR, ArrayType(FloatType()))])
    return members.groupBy(TEMPLATE, IDENTITY).applyInPandas(pool, schema)


def set_protocol(images: DataFrame, params: EvaluateConfig, results: EvalResults, counts: dict[str, int]) -> None:
    """Template-to-template TAR at each supported FAR, one row per pooling method."""
    pooled = pooled_templates(images, params).persist()
    try:
        items = pooled.select(F.col(TEMPLATE).alias(ITEM), IDENTITY).distinct()
        genuine = genuine_pairs(items, per_identity=params.genuine_pairs_per_identity,
                                max_total=params.max_genuine_pairs, seed=params.seed)
        impostor = impostor_pairs(items, count=params.impostor_pairs, seed=params.seed)
        pairs = genuine.withColumn(SAME, F.lit(True)).unionByName(impostor.withColumn(SAME, F.lit(False)))
        pa = pooled.select(F.col(TEMPLATE).alias("_ta"), "method", F.col(VECTOR).alias("_va"))
        pb = pooled.select(F.col(TEMPLATE).alias("_tb"), F.col("method").alias("_mb"), F.col(VECTOR).alias("_vb"))
        scored = (
            pairs.join(pa, F.col(A) == F.col("_ta"))
            .join(pb, (F.col(B) == F.col("_tb")) & (F.col("method") == F.col("_mb")))
            .select("method", SAME, dot("_va", "_vb").alias(SIM))
            .toPandas()
        )
        counts["templates"] = int(items.count())
    finally:
        pooled.unpersist()
    for method in metrics.POOLING_METHODS:
        rows = scored[scored["method"] == method]
        gen, imp = rows.loc[rows[SAME], SIM].to_numpy(float), rows.loc[~rows[SAME], SIM].to_numpy(float)
        if gen.size == 0 or imp.size == 0:
            results.notes["set"] = f"skipped: {gen.size} genuine and {imp.size} impostor template pairs"
            return
        for far in metrics.supported_rates(imp.size, params.fars)[0]:
            results.point("set", method, "far", far, metrics.verification_at_far(gen, imp, far))
    counts["template_pairs"] = int(len(scored) // len(metrics.POOLING_METHODS))


# --------------------------------------------------------------------------- the stage


def write_results(
    spark: SparkSession, cfg: ErsConfig, run: StageRun, context: dict[str, Any], gamma: float, results: EvalResults
) -> None:
    """Append this run's rows to eval_runs, eval_metrics and eval_curves."""
    runs_row = (run.run_id, run.started_at.replace(tzinfo=None), context["model"], context["uic_id"], float(gamma),
                json.dumps(run.params, sort_keys=True, default=str),
                json.dumps(context["input_versions"], sort_keys=True), context["pairs_source"])
    append(spark, cfg, EVAL_RUNS, spark.createDataFrame([runs_row], EVAL_RUNS.schema))
    append(spark, cfg, EVAL_METRICS, spark.createDataFrame([(run.run_id, *r) for r in results.metrics], EVAL_METRICS.schema))
    if results.curves:
        append(spark, cfg, EVAL_CURVES, spark.createDataFrame([(run.run_id, *r) for r in results.curves], EVAL_CURVES.schema))


def run_evaluate(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Run the evaluate stage; counts say how many comparisons each protocol rests on."""
    params = EvaluateParams.from_config(cfg)
    p = params.cfg
    report_path = cfg.report.output_path(cfg.storage) if p.write_report else None  # a bad report.path fails first
    images, context = load_images(spark, cfg, params)
    roles = identity_roles(images, p).persist()  # one single-partition window over identities, computed once
    images = images.join(roles, IDENTITY, "left").persist()
    try:
        run = StageRun(STAGE_NAME, params={**asdict(p), "uic_id": context["uic_id"], "model": context["model"]})
        run.input_versions = dict(context["input_versions"])
        counts: dict[str, int] = {"images": images.count(), "identities": roles.count(),
                                  "calibration_identities": roles.where(CALIBRATION).count()}
        context["pairs_source"] = f"file:{p.pairs_path}" if p.pairs_path else "identities"
        results = EvalResults()
        pairs = build_pairs(spark, images, p, counts)
        gamma = verification_protocol(pairs, p, results)
        edc_protocol(pairs, p, results)
        if counts["identities"] >= 2:
            probes = identification_probes(images, p)
            counts["probes"] = len(probes)
            identification_protocol(probes, gamma, p, results)
            set_protocol(images, p, results, counts)
        else:
            results.notes["identification"] = results.notes["set"] = "skipped: the crops carry fewer than 2 identities"
    finally:
        images.unpersist()
        roles.unpersist()
    run.params.update(gamma=gamma, notes=results.notes, report=str(report_path) if report_path else None)
    counts.update(metrics=len(results.metrics), curve_points=len(results.curves))
    run.counts = counts
    write_results(spark, cfg, run, context, gamma, results)
    log.info("evaluate: gamma %.4f; %d metric rows, %d curve points", gamma, len(results.metrics), len(results.curves))
    record = run.finish(spark, cfg, outputs=(EVAL_RUNS, EVAL_METRICS, EVAL_CURVES))
    if report_path is not None:
        from ers_spark.stages.report import run_report  # matplotlib only when the page is wanted

        run_report(spark, cfg)
    return record
