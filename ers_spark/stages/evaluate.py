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

The Spark side of the pairs, the gallery search and the templates is in :mod:`ers_spark.distributed.pairs`,
:mod:`ers_spark.distributed.metrics` and :mod:`ers_spark.distributed.calibration` (the split of the identities).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from ers_spark.config import ErsConfig, EvaluateConfig
from ers_spark.core import metrics
from ers_spark.core.calibration import calibrate_gamma_split
from ers_spark.core.metrics import threshold_at_far
from ers_spark.distributed.calibration import CALIBRATION, NONMATED, identity_roles
from ers_spark.distributed.metrics import TEMPLATE, VECTOR, identification_probes, pooled_templates
from ers_spark.distributed.pairs import A, B, ITEM, SAME, SIM, dot, genuine_pairs, impostor_pairs, resolve_pair_file, score_pairs
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
from ers_spark.runtime.cluster_paths import require_shared_paths
from ers_spark.runtime.driver_files import checked_report_path
from ers_spark.lake.tables import StageRun, append, image_labels, latest_model, of_model, read_table, table_version
from ers_spark.stages.score import select_centroid

STAGE_NAME = "evaluate"
log = logging.getLogger(__name__)

PAIRS_COLUMNS = ("left", "right", "label")


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


# --------------------------------------------------------------------------- inputs


def load_images(spark: SparkSession, cfg: ErsConfig) -> tuple[DataFrame, dict[str, Any]]:
    """One row per scored image of the model + UIC: embedding, ERS, raw norm, identity, source path."""
    embeddings_all = read_table(spark, cfg, EMBEDDINGS, hint="run `ers-spark embed` first")
    model = latest_model(embeddings_all)[:2]
    centroid = select_centroid(spark, cfg, model, cfg.score.uic_id)
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


# --------------------------------------------------------------------------- pairs


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
    calibration = calibrate_gamma_split(sim, q, q, same, cal, params.target_far)
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
    p = cfg.evaluate
    require_shared_paths(cfg, spark.sparkContext.master, {"evaluate.pairs_path": p.pairs_path})
    report_path = checked_report_path(spark, cfg) if p.write_report else None  # a bad report.path fails first
    images, context = load_images(spark, cfg)
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
