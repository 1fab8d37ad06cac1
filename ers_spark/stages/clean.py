"""Clean stage: scores -> cleaned (recognizable, label-consistent crops) and quarantine (the rest, with a reason).

1. ``ers < gamma`` -> quarantine, reason ``unrecognizable``.
2. For identity-labelled crops, sub-center ArcFace label-noise cleaning: per
   identity, k sub-centres by spherical k-means; samples whose angle to the
   dominant (largest) sub-centre exceeds ``clean.max_angle_deg`` -> quarantine,
   reason ``label_noise``. The paper's 75 degrees is for ArcFace; when
   ``max_angle_deg`` is null it is calibrated for the model at hand as the 1st
   percentile of *impostor* angles (the angle between an identity's dominant
   centre and images of other identities): a sample farther from its own
   centre than 99% of other people's images are is treated as mislabelled.

The cleaned table is kept in sync with the current scores (rows that became
unrecognizable under a new UIC leave it), and in = cleaned + quarantined, always.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, StringType, StructField, StructType

from ers_spark.core import ers as ers_math
from ers_spark.config import ErsConfig
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
from ers_spark.lake.tables import StageRun, ensure_table, latest_model, merge_sync, quarantine_rows, read_table, table_version

STAGE_NAME = "clean"
log = logging.getLogger(__name__)
IMPOSTOR_PERCENTILE = 1.0


@dataclass(frozen=True)
class CleanParams:
    """The clean stage's parameters (from ``clean.*``)."""

    label_noise: bool
    subcenters: int
    max_angle_deg: float | None
    min_identity_size: int

    @classmethod
    def from_config(cls, cfg: ErsConfig) -> "CleanParams":
        c = cfg.clean
        return cls(c.label_noise, c.subcenters, c.max_angle_deg, c.min_identity_size)


ANGLE_SCHEMA = StructType(
    [
        StructField(IMAGE_ID, StringType(), False),
        StructField(SUBCENTER_ANGLE, DoubleType(), False),
        StructField("_centre", StringType(), False),
    ]
)


def _identity_angles(k: int, min_size: int):
    """applyInPandas function: angle of each image to its identity's dominant sub-centre."""

    def per_identity(pdf: pd.DataFrame) -> pd.DataFrame:
        emb = np.stack(pdf[EMBEDDING].to_numpy()).astype(np.float32)
        if len(pdf) < min_size:
            centre = ers_math.ui_centroid(emb)
            angles = np.degrees(np.arccos(np.clip(ers_math.normalize_rows(emb) @ centre, -1.0, 1.0)))
        else:
            _, angles, centre = ers_math.subcenter_label_noise(emb, k=k, max_angle_deg=180.0)
        centre_text = ",".join(f"{x:.7g}" for x in centre)
        return pd.DataFrame({IMAGE_ID: pdf[IMAGE_ID].to_numpy(), SUBCENTER_ANGLE: angles, "_centre": centre_text})

    return per_identity


def calibrate_max_angle(centres: np.ndarray, centre_identity: np.ndarray, emb: np.ndarray, identity: np.ndarray) -> float:
    """1st percentile of impostor angles: image of identity A vs the dominant centre of identity B != A."""
    cos = ers_math.normalize_rows(emb) @ ers_math.normalize_rows(centres).T
    impostor = identity[:, None] != centre_identity[None, :]
    angles = np.degrees(np.arccos(np.clip(cos[impostor], -1.0, 1.0)))
    if angles.size == 0:
        raise ValueError("calibrate_max_angle needs at least two identities")
    return float(np.percentile(angles, IMPOSTOR_PERCENTILE))


def label_noise_angles(
    labelled: DataFrame, params: CleanParams
) -> tuple[DataFrame, float | None]:
    """Per-image angle to its identity's dominant sub-centre, and the angle threshold to apply."""
    angles = labelled.groupBy(IDENTITY).applyInPandas(
        _identity_angles(params.subcenters, max(params.min_identity_size, params.subcenters)),
        "image_id string, subcenter_angle_deg double, _centre string",
    )
    angles = angles.join(labelled.select(IMAGE_ID, IDENTITY), IMAGE_ID).cache()
    if params.max_angle_deg is not None:
        return angles, params.max_angle_deg
    centres = angles.select(IDENTITY, "_centre").dropDuplicates([IDENTITY]).toPandas()
    if len(centres) < 2:
        return angles, None
    centre_matrix = np.array([[float(x) for x in c.split(",")] for c in centres["_centre"]], dtype=np.float32)
    sample = labelled.select(IDENTITY, EMBEDDING).sample(fraction=1.0, seed=0).limit(5000).toPandas()
    emb = np.stack(sample[EMBEDDING].to_numpy()).astype(np.float32)
    threshold = calibrate_max_angle(centre_matrix, centres[IDENTITY].to_numpy(), emb, sample[IDENTITY].to_numpy())
    return angles, threshold


def run_clean(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Run the clean stage; counts: scored = cleaned + quarantined (unrecognizable + label_noise)."""
    params = CleanParams.from_config(cfg)
    scores_all = read_table(spark, cfg, SCORES, hint="run `ers-spark score` first")
    model = latest_model(scores_all, time_column=SCORED_AT)[:2]
    scores = scores_all.where((F.col(MODEL_NAME) == model[0]) & (F.col(MODEL_VERSION) == model[1]))
    crops = read_table(spark, cfg, CROPS).select(IMAGE_ID, SOURCE_PATH, IDENTITY)
    run = StageRun(STAGE_NAME, params={**asdict(params), "model": list(model)})
    run.input_versions = {SCORES.name: table_version(spark, cfg, SCORES), CROPS.name: table_version(spark, cfg, CROPS)}

    rows = scores.select(IMAGE_ID, ERS, RECOGNIZABLE, UIC_ID, MODEL_NAME, MODEL_VERSION).join(crops, IMAGE_ID, "left")
    threshold = None
    if params.label_noise:
        embeddings = read_table(spark, cfg, EMBEDDINGS).where(
            (F.col(MODEL_NAME) == model[0]) & (F.col(MODEL_VERSION) == model[1])
        )
        labelled = (
            rows.where(F.col(RECOGNIZABLE) & F.col(IDENTITY).isNotNull())
            .select(IMAGE_ID, IDENTITY)
            .join(embeddings.select(IMAGE_ID, EMBEDDING), IMAGE_ID)
        )
        angles, threshold = label_noise_angles(labelled, params)
        rows = rows.join(angles.select(IMAGE_ID, SUBCENTER_ANGLE), IMAGE_ID, "left")
    else:
        rows = rows.withColumn(SUBCENTER_ANGLE, F.lit(None).cast("double"))
    noisy = (F.col(SUBCENTER_ANGLE) > F.lit(threshold)) if threshold is not None else F.lit(False)
    reason = F.when(~F.col(RECOGNIZABLE), F.lit(REASON_UNRECOGNIZABLE)).when(noisy, F.lit(REASON_LABEL_NOISE))
    decided = rows.withColumn(REASON, reason).cache()
    now = F.current_timestamp()
    cleaned = decided.where(F.col(REASON).isNull()).select(
        IMAGE_ID, SOURCE_PATH, IDENTITY, ERS, SUBCENTER_ANGLE, UIC_ID, MODEL_NAME, MODEL_VERSION, now.alias(CLEANED_AT)
    )
    detail = F.when(
        F.col(REASON) == REASON_UNRECOGNIZABLE, F.format_string("ers=%.4f below gamma", F.col(ERS))
    ).otherwise(F.format_string("angle %.1f deg to dominant sub-centre > %.1f", F.col(SUBCENTER_ANGLE), F.lit(threshold or 0.0)))
    quarantined = quarantine_rows(
        decided.where(F.col(REASON).isNotNull()), STAGE_NAME, F.col(REASON), detail, ers=F.col(ERS), uic_id=F.col(UIC_ID)
    )
    uic_ids = [r[UIC_ID] for r in scores.select(UIC_ID).distinct().limit(2).collect()]
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
        "cleaned_changed": sum(cleaned_changes.values()),
        "quarantine_changed": sum(quarantine_changes.values()),
    }
    if threshold is not None:
        log.info(f"clean: label-noise angle threshold {threshold:.1f} deg")
    return run.finish(spark, cfg, outputs=(CLEANED, QUARANTINE))
