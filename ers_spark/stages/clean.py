"""Clean stage: scores -> cleaned (recognizable, label-consistent crops) and quarantine (the rest, with a reason).

1. ``ers < gamma`` -> quarantine, reason ``unrecognizable``.
2. For identity-labelled recognizable crops, label-noise cleaning in the manner of sub-center
   ArcFace (see :func:`ers_spark.core.subcentres.subcenter_label_noise`): per identity of n images,
   ``min(clean.subcenters, n // clean.min_images_per_subcenter)`` (>= 1) sub-centres by
   spherical k-means, an approximation of sub-center ArcFace's learned sub-centres; the largest
   is the dominant one, and sub-centres within the angle threshold of it join it (the clean
   group). Each image's angle to the clean group's mean *without that image* is its *own angle*.
   Identities with fewer than ``clean.min_identity_size`` images are not checked.
3. An image is quarantined as ``label_noise`` when both hold:
   - *far from its own identity*: own angle > ``clean.max_angle_deg`` when set (the paper's 75
     degrees is for ArcFace), else > the ``clean.impostor_percentile``-th percentile of
     *impostor* angles (a seeded sample of images, capped at ``clean.calibration_sample_rows``,
     against the dominant sub-centres of a seeded sample of other identities, capped at
     ``clean.calibration_identities``);
   - *claimed by another identity*: its angle to the nearest clean centre of another identity is
     at most the ``clean.genuine_percentile``-th percentile of the checked images' own angles
     (default 60: about as close to that person as a typical image is to its own).
   A swapped label satisfies both; a degraded image of the right person is far from its own
   identity but also from everyone else's, so it is left to the ERS rule (1).

The cleaned table is kept in sync with the current scores (rows that became
unrecognizable under a new UIC leave it), and in = cleaned + quarantined, always.
Steps 2 and 3 run on Spark in :mod:`ers_spark.distributed.subcentres`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from ers_spark.config import CleanConfig, ErsConfig
from ers_spark.distributed.subcentres import (
    LABEL_NOISE,
    OTHER_ANGLE,
    OTHER_IDENTITY,
    LabelNoiseCheck,
    label_noise_flags,
)
from ers_spark.lake.contracts import (
    CLEANED,
    CLEANED_AT,
    EMBEDDING,
    EMBEDDINGS,
    ERS,
    IDENTITY,
    IMAGE_ID,
    LABEL_TABLES,
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
    image_labels,
    latest_model,
    merge_sync,
    of_model,
    quarantine_rows,
    read_table,
    table_version,
)

STAGE_NAME = "clean"
log = logging.getLogger(__name__)


def decide(rows: DataFrame, embeddings: DataFrame, params: CleanConfig) -> tuple[DataFrame, LabelNoiseCheck]:
    """Every scored row with its ``reason`` (null: cleaned), subcenter angle and nearest other identity; and the check."""
    check = LabelNoiseCheck()
    if params.label_noise:
        labelled = (
            rows.where(F.col(RECOGNIZABLE) & F.col(IDENTITY).isNotNull())
            .select(IMAGE_ID, IDENTITY)
            .join(embeddings.select(IMAGE_ID, EMBEDDING), IMAGE_ID)
        )
        check = label_noise_flags(labelled, params)
    if check.flags is None:
        rows = (rows.withColumn(SUBCENTER_ANGLE, F.lit(None).cast("double")).withColumn(LABEL_NOISE, F.lit(False))
                .withColumn(OTHER_ANGLE, F.lit(None).cast("double")).withColumn(OTHER_IDENTITY, F.lit(None).cast("string")))
    else:
        rows = rows.join(check.flags, IMAGE_ID, "left")
    noisy = F.coalesce(F.col(LABEL_NOISE), F.lit(False))
    reason = F.when(~F.col(RECOGNIZABLE), F.lit(REASON_UNRECOGNIZABLE)).when(noisy, F.lit(REASON_LABEL_NOISE))
    return rows.withColumn(REASON, reason).drop(LABEL_NOISE), check


def write_outputs(spark: SparkSession, cfg: ErsConfig, decided: DataFrame, model: tuple[str, str],
                  uic_ids: list[str], check: LabelNoiseCheck) -> dict[str, int]:
    """MERGE the cleaned rows and the quarantined ones (with a one-line detail each); return the changed-row counts."""
    now = F.current_timestamp()
    cleaned = decided.where(F.col(REASON).isNull()).select(
        IMAGE_ID, SOURCE_PATH, IDENTITY, ERS, SUBCENTER_ANGLE, UIC_ID, MODEL_NAME, MODEL_VERSION, now.alias(CLEANED_AT)
    )
    detail = F.when(
        F.col(REASON) == REASON_UNRECOGNIZABLE, F.format_string("ers=%.4f below gamma", F.col(ERS))
    ).otherwise(F.format_string(
        "angle %.1f deg to its identity's clean sub-centre > %.1f; %.1f deg to %s's <= %.1f",
        F.col(SUBCENTER_ANGLE), F.lit(check.max_angle_deg or 0.0), F.col(OTHER_ANGLE), F.col(OTHER_IDENTITY),
        F.lit(check.claim_angle_deg or 0.0),
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


def table_counts(spark: SparkSession, cfg: ErsConfig) -> dict[str, int]:
    """What the tables hold after the MERGEs: rows of cleaned, and clean's quarantine rows by reason.

    Both MERGEs make their table (clean's scope of quarantine) equal their source, so these are the
    decisions as written, not a second evaluation of them.
    """
    quarantined = (read_table(spark, cfg, QUARANTINE).where(F.col(STAGE) == STAGE_NAME)
                   .groupBy(REASON).agg(F.count(F.lit(1)).alias("n")).collect())
    by_reason = {row[REASON]: int(row["n"]) for row in quarantined}
    return {"cleaned": read_table(spark, cfg, CLEANED).count(), "quarantined": sum(by_reason.values()),
            "unrecognizable": by_reason.get(REASON_UNRECOGNIZABLE, 0), "label_noise": by_reason.get(REASON_LABEL_NOISE, 0)}


def run_clean(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Run the clean stage; counts: scored = cleaned + quarantined (unrecognizable + label_noise), as written."""
    params = cfg.clean
    scores_all = read_table(spark, cfg, SCORES, hint="run `ers-spark score` first")
    model = latest_model(scores_all, time_column=SCORED_AT)[:2]
    scores = scores_all.where(of_model(model))
    labels = image_labels(spark, cfg)
    run = StageRun(STAGE_NAME, params={**asdict(params), "model": list(model)})
    run.input_versions = {c.name: table_version(spark, cfg, c) for c in (SCORES, *LABEL_TABLES)}

    rows = scores.select(IMAGE_ID, ERS, RECOGNIZABLE, UIC_ID, MODEL_NAME, MODEL_VERSION).join(labels, IMAGE_ID, "left")
    embeddings = read_table(spark, cfg, EMBEDDINGS).where(of_model(model)) if params.label_noise else None
    decided, check = decide(rows, embeddings, params)
    decided = decided.cache()
    uic_ids = [r[UIC_ID] for r in scores.select(UIC_ID).distinct().limit(2).collect()]
    changes = write_outputs(spark, cfg, decided, model, uic_ids, check)
    scored = decided.count()
    decided.unpersist()
    check.unpersist()
    written = table_counts(spark, cfg)
    if written["cleaned"] + written["quarantined"] != scored:  # a concurrent clean of this lake, or a bug
        raise RuntimeError(f"clean: {scored} scored rows but the tables hold {written['cleaned']} cleaned + "
                           f"{written['quarantined']} quarantined; re-run clean (no other clean may write this lake)")
    run.params.update(max_angle_deg_applied=check.max_angle_deg, claim_angle_deg_applied=check.claim_angle_deg)
    run.counts = {"scored": scored, **written, **changes}
    if check.max_angle_deg is not None:
        log.info("clean: label noise = farther than %.1f deg from its own identity and within %s deg of another's",
                 check.max_angle_deg, "n/a" if check.claim_angle_deg is None else f"{check.claim_angle_deg:.1f}")
    return run.finish(spark, cfg, outputs=(CLEANED, QUARANTINE))
