"""Clean stage: scores -> cleaned (recognizable, label-consistent crops) and quarantine (the rest, with a reason).

1. ``ers < gamma`` -> quarantine, reason ``unrecognizable``.
2. For identity-labelled recognizable crops, label-noise cleaning in the manner of sub-center
   ArcFace (see :func:`ers_spark.core.ers.subcenter_label_noise`): per identity of n images,
   ``min(clean.subcenters, n // clean.min_images_per_subcenter)`` (>= 1) sub-centres by
   spherical k-means, an approximation of sub-center ArcFace's learned sub-centres; the largest
   is the dominant one, and sub-centres within the angle threshold of it join it (the clean
   group). Each image's angle to the clean group's mean *without that image* is compared with
   the threshold; images beyond it -> quarantine, reason ``label_noise``. Identities with
   fewer than ``clean.min_identity_size`` images are not checked (their centre is too noisy).
3. The threshold is ``clean.max_angle_deg`` when set (the paper's 75 degrees is for ArcFace);
   when null it is calibrated for the model at hand as the ``clean.impostor_percentile``-th
   percentile of *impostor* angles (a seeded sample of images, capped at
   ``clean.calibration_sample_rows``, against the dominant sub-centres of a seeded sample of
   other identities, capped at ``clean.calibration_identities``). A swapped label *is* an
   impostor image, so about ``1 - impostor_percentile/100`` of them are caught; a correctly
   labelled image is flagged only when it is farther from its own identity than the closest
   ``impostor_percentile`` % of other people's images are.

The cleaned table is kept in sync with the current scores (rows that became
unrecognizable under a new UIC leave it), and in = cleaned + quarantined, always.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from ers_spark.core import ers as ers_math
from ers_spark.config import CleanConfig, ErsConfig
from ers_spark.lake.contracts import (
    CLEANED,
    CLEANED_AT,
    CROPS,
    EMBEDDING,
    EMBEDDINGS,
    ERS,
    IDENTITY,
    IMAGE_ID,
    MODEL_NAME,
    MODEL_VERSION,
    QUARANTINE,
    REASON,
    REASON_LABEL_NOISE,
    REASON_UNRECOGNIZABLE,
    RECOGNIZABLE,
    SCORED_AT,
    SCORES,
    SOURCE_PATH,
    STAGE,
    SUBCENTER_ANGLE,
    UIC_ID,
)
from ers_spark.lake.tables import (
    StageRun,
    ensure_table,
    latest_model,
    merge_sync,
    of_model,
    quarantine_rows,
    read_table,
    table_version,
)

STAGE_NAME = "clean"
log = logging.getLogger(__name__)
LABEL_NOISE = "_label_noise"
CENTRE = "_centre"
IMPOSTOR_ANGLE = "impostor_angle_deg"
PERCENTILE_ACCURACY = 10000  # percentile_approx: rank error <= 1/10000 of the sampled angles


class CleanParams(CleanConfig):
    """The clean stage's parameters: exactly ``clean.*`` (validated once, by the config loader)."""

    @classmethod
    def from_config(cls, cfg: ErsConfig) -> "CleanParams":
        return cls(**dataclasses.asdict(cfg.clean))


def _embeddings_of(pdf: pd.DataFrame) -> np.ndarray:
    return np.stack(pdf[EMBEDDING].to_numpy()).astype(np.float32)


def _dominant_centres(params: CleanParams) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """applyInPandas function: one row per checked identity with its dominant sub-centre."""

    def per_identity(pdf: pd.DataFrame) -> pd.DataFrame:
        if len(pdf) < params.min_identity_size:
            return pd.DataFrame({IDENTITY: pd.Series([], dtype=object), CENTRE: pd.Series([], dtype=object)})
        k = ers_math.subcentre_count(len(pdf), params.subcenters, params.min_images_per_subcenter)
        centre, _, _ = ers_math.dominant_subcentre(_embeddings_of(pdf), k, seed=params.seed)
        return pd.DataFrame({IDENTITY: [pdf[IDENTITY].iloc[0]], CENTRE: [centre.tolist()]})

    return per_identity


def _flag_identity(params: CleanParams, threshold: float) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """applyInPandas function: each image's leave-one-out angle to its identity's clean group, and its flag."""

    def per_identity(pdf: pd.DataFrame) -> pd.DataFrame:
        n = len(pdf)
        k = ers_math.subcentre_count(n, params.subcenters, params.min_images_per_subcenter)
        keep, angles, _ = ers_math.subcenter_label_noise(_embeddings_of(pdf), k=k, max_angle_deg=threshold, seed=params.seed)
        checked = n >= params.min_identity_size
        return pd.DataFrame({IMAGE_ID: pdf[IMAGE_ID].to_numpy(), SUBCENTER_ANGLE: angles, LABEL_NOISE: ~keep & checked})

    return per_identity


def seeded_sample(df: DataFrame, key: str, cap: int, seed: int) -> DataFrame:
    """At most ``cap`` rows, a pseudo-random choice fixed by ``seed`` and the rows' keys (not their order or partitioning)."""
    return df.orderBy(F.xxhash64(F.col(key).cast("string"), F.lit(seed))).limit(cap)


def _impostor_angle_batches(centres: np.ndarray, centre_identity: np.ndarray):
    """mapInPandas function: every impostor angle of a batch of sampled images against the sampled centres."""

    def batches(pdfs: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in pdfs:
            if len(pdf):
                angles = ers_math.impostor_angles(_embeddings_of(pdf), pdf[IDENTITY].to_numpy(), centres, centre_identity)
                yield pd.DataFrame({IMPOSTOR_ANGLE: angles})

    return batches


def calibrate_threshold(labelled: DataFrame, centres: DataFrame, params: CleanParams) -> float | None:
    """The impostor-angle percentile from capped seeded samples (None with fewer than two checked identities).

    Only the sampled centres (at most ``calibration_identities``) reach the driver; the angles
    are computed and their percentile taken on the executors.
    """
    sampled = seeded_sample(centres, IDENTITY, params.calibration_identities, params.seed).collect()
    if len(sampled) < 2:
        return None
    centre_matrix = np.array([r[CENTRE] for r in sampled], dtype=np.float32)
    centre_identity = np.array([r[IDENTITY] for r in sampled])
    images = seeded_sample(labelled, IMAGE_ID, params.calibration_sample_rows, params.seed)
    angles = images.mapInPandas(_impostor_angle_batches(centre_matrix, centre_identity), f"{IMPOSTOR_ANGLE} double")
    q = params.impostor_percentile / 100.0
    value = angles.agg(F.percentile_approx(IMPOSTOR_ANGLE, q, PERCENTILE_ACCURACY).alias("t")).first()["t"]
    return None if value is None else float(value)


def label_noise_flags(labelled: DataFrame, params: CleanParams) -> tuple[DataFrame | None, float | None]:
    """Per image: angle to its identity's clean group and the label-noise flag; and the threshold applied.

    ``(None, None)`` when the threshold is to be calibrated and there are fewer than two
    checked identities (nothing to call an impostor).
    """
    threshold = params.max_angle_deg
    if threshold is None:
        centres = labelled.groupBy(IDENTITY).applyInPandas(
            _dominant_centres(params), f"{IDENTITY} string, {CENTRE} array<float>"
        )
        threshold = calibrate_threshold(labelled, centres, params)
        if threshold is None:
            log.warning("clean: fewer than two identities with >= %d images; label noise not checked", params.min_identity_size)
            return None, None
    flags = labelled.groupBy(IDENTITY).applyInPandas(
        _flag_identity(params, threshold), f"{IMAGE_ID} string, {SUBCENTER_ANGLE} double, {LABEL_NOISE} boolean"
    )
    return flags, threshold


def decide(rows: DataFrame, embeddings: DataFrame, params: CleanParams) -> tuple[DataFrame, float | None]:
    """Every scored row with its ``reason`` (null: cleaned) and subcenter angle; and the angle threshold applied."""
    flags, threshold = None, None
    if params.label_noise:
        labelled = (
            rows.where(F.col(RECOGNIZABLE) & F.col(IDENTITY).isNotNull())
            .select(IMAGE_ID, IDENTITY)
            .join(embeddings.select(IMAGE_ID, EMBEDDING), IMAGE_ID)
        )
        flags, threshold = label_noise_flags(labelled, params)
    if flags is None:
        rows = rows.withColumn(SUBCENTER_ANGLE, F.lit(None).cast("double")).withColumn(LABEL_NOISE, F.lit(False))
    else:
        rows = rows.join(flags, IMAGE_ID, "left")
    noisy = F.coalesce(F.col(LABEL_NOISE), F.lit(False))
    reason = F.when(~F.col(RECOGNIZABLE), F.lit(REASON_UNRECOGNIZABLE)).when(noisy, F.lit(REASON_LABEL_NOISE))
    return rows.withColumn(REASON, reason).drop(LABEL_NOISE), threshold


def write_outputs(spark: SparkSession, cfg: ErsConfig, decided: DataFrame, model: tuple[str, str],
                  uic_ids: list[str], threshold: float | None) -> dict[str, int]:
    """MERGE the cleaned rows and the quarantined ones (with a one-line detail each); return the changed-row counts."""
    now = F.current_timestamp()
    cleaned = decided.where(F.col(REASON).isNull()).select(
        IMAGE_ID, SOURCE_PATH, IDENTITY, ERS, SUBCENTER_ANGLE, UIC_ID, MODEL_NAME, MODEL_VERSION, now.alias(CLEANED_AT)
    )
    detail = F.when(
        F.col(REASON) == REASON_UNRECOGNIZABLE, F.format_string("ers=%.4f below gamma", F.col(ERS))
    ).otherwise(F.format_string(
        "angle %.1f deg to its identity's clean sub-centre > %.1f", F.col(SUBCENTER_ANGLE), F.lit(threshold or 0.0)
    ))
    quarantined = quarantine_rows(
        decided.where(F.col(REASON).isNotNull()), STAGE_NAME, F.col(REASON), detail, ers=F.col(ERS), uic_id=F.col(UIC_ID)
    )
    ensure_table(
        spark, cfg, CLEANED,
        properties={"ers.model_name": model[0], "ers.model_version": model[1], "ers.uic_id": ",".join(uic_ids)},
    )
    cleaned_changes = merge_sync(
        spark, cfg, CLEANED, cleaned, compare=(ERS, UIC_ID, SUBCENTER_ANGLE, MODEL_VERSION), delete_scope="true"
    )
    quarantine_changes = merge_sync(
        spark, cfg, QUARANTINE, quarantined, compare=(REASON, ERS, UIC_ID), delete_scope=f"t.{STAGE} = '{STAGE_NAME}'"
    )
    return {"cleaned_changed": sum(cleaned_changes.values()), "quarantine_changed": sum(quarantine_changes.values())}


def run_clean(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Run the clean stage; counts: scored = cleaned + quarantined (unrecognizable + label_noise)."""
    params = CleanParams.from_config(cfg)
    scores_all = read_table(spark, cfg, SCORES, hint="run `ers-spark score` first")
    model = latest_model(scores_all, time_column=SCORED_AT)[:2]
    scores = scores_all.where(of_model(model))
    crops = read_table(spark, cfg, CROPS).select(IMAGE_ID, SOURCE_PATH, IDENTITY)
    run = StageRun(STAGE_NAME, params={**asdict(params), "model": list(model)})
    run.input_versions = {SCORES.name: table_version(spark, cfg, SCORES), CROPS.name: table_version(spark, cfg, CROPS)}

    rows = scores.select(IMAGE_ID, ERS, RECOGNIZABLE, UIC_ID, MODEL_NAME, MODEL_VERSION).join(crops, IMAGE_ID, "left")
    embeddings = read_table(spark, cfg, EMBEDDINGS).where(of_model(model)) if params.label_noise else None
    decided, threshold = decide(rows, embeddings, params)
    decided = decided.cache()
    uic_ids = [r[UIC_ID] for r in scores.select(UIC_ID).distinct().limit(2).collect()]
    changes = write_outputs(spark, cfg, decided, model, uic_ids, threshold)
    counts = {r[REASON] or "cleaned": int(r["n"]) for r in decided.groupBy(REASON).agg(F.count(F.lit(1)).alias("n")).collect()}
    decided.unpersist()
    scored = sum(counts.values())
    run.params.update(max_angle_deg_applied=threshold)
    run.counts = {
        "scored": scored,
        "cleaned": counts.get("cleaned", 0),
        "quarantined": scored - counts.get("cleaned", 0),
        "unrecognizable": counts.get(REASON_UNRECOGNIZABLE, 0),
        "label_noise": counts.get(REASON_LABEL_NOISE, 0),
        **changes,
    }
    if threshold is not None:
        log.info("clean: label-noise angle threshold %.1f deg", threshold)
    return run.finish(spark, cfg, outputs=(CLEANED, QUARANTINE))
