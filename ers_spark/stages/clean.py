"""Clean stage: scores -> cleaned (recognizable, label-consistent crops) and quarantine (the rest, with a reason).

1. ``ers < gamma`` -> quarantine, reason ``unrecognizable``.
2. For identity-labelled recognizable crops, label-noise cleaning in the manner of sub-center
   ArcFace (see :func:`ers_spark.core.ers.subcenter_label_noise`): per identity of n images,
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
    seeded_sample,
    table_version,
)

STAGE_NAME = "clean"
log = logging.getLogger(__name__)
LABEL_NOISE = "_label_noise"
CENTRE = "_centre"
IMPOSTOR_ANGLE = "impostor_angle_deg"
CHECKED = "_checked"
FAR_FROM_OWN = "_far_from_own"
OTHER_ANGLE = "_other_angle_deg"
OTHER_IDENTITY = "_other_identity"
CENTRE_BLOCK_ROWS = 2048  # images or centres per block in the nearest-other-centre cross join (2048^2 cosines a task)
PERCENTILE_ACCURACY = 10000  # percentile_approx: rank error <= 1/10000 of the sampled angles


class CleanParams(CleanConfig):
    """The clean stage's parameters: exactly ``clean.*`` (validated once, by the config loader)."""

    @classmethod
    def from_config(cls, cfg: ErsConfig) -> "CleanParams":
        return cls(**dataclasses.asdict(cfg.clean))


def _embeddings_of(pdf: pd.DataFrame) -> np.ndarray:
    return np.stack(pdf[EMBEDDING].to_numpy()).astype(np.float32)


def whole_identity_frames(pdfs: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Arrow batches of a partition sorted by identity, re-cut so no identity spans two frames.

    Arrow cuts batches by row count, so the last identity of a batch is carried into the next; it
    holds at most ``max_identity_rows`` rows.
    """
    carry = None
    for pdf in pdfs:
        pdf = pdf if carry is None else pd.concat([carry, pdf], ignore_index=True)
        if not len(pdf):
            continue
        tail = (pdf[IDENTITY] == pdf[IDENTITY].iloc[-1]).to_numpy()
        carry = pdf[tail].reset_index(drop=True)
        if not tail.all():
            yield pdf[~tail].reset_index(drop=True)
    if carry is not None and len(carry):
        yield carry


def _per_identity(labelled: DataFrame, per_frame: Callable[[pd.DataFrame], pd.DataFrame], schema: str) -> DataFrame:
    """``per_frame`` over frames of whole identities, many identities per Python call.

    One call per identity (``applyInPandas``) costs far more than the math on an identity of ten
    images; a sorted partition cut into whole identities keeps the calls per Arrow batch.
    """
    by_identity = labelled.repartition(IDENTITY).sortWithinPartitions(IDENTITY)
    return by_identity.mapInPandas(lambda pdfs: (per_frame(pdf) for pdf in whole_identity_frames(pdfs)), schema)


def _identity_slices(pdf: pd.DataFrame) -> tuple[np.ndarray, list[np.ndarray]]:
    """(embeddings of the frame, row positions of each identity in it)."""
    return _embeddings_of(pdf), list(pdf.groupby(IDENTITY, sort=False, dropna=False).indices.values())


def _dominant_centres(params: CleanParams) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """Frame function: one row per checked identity with its dominant sub-centre."""

    def per_frame(pdf: pd.DataFrame) -> pd.DataFrame:
        x, slices = _identity_slices(pdf)
        names, centres = [], []
        for rows in (r for r in slices if len(r) >= params.min_identity_size):
            k = ers_math.subcentre_count(len(rows), params.subcenters, params.min_images_per_subcenter)
            centre, _, _ = ers_math.dominant_subcentre(x[rows], k, seed=params.seed)
            names.append(pdf[IDENTITY].iloc[rows[0]])
            centres.append(centre.tolist())
        return pd.DataFrame({IDENTITY: pd.Series(names, dtype=object), CENTRE: pd.Series(centres, dtype=object)})

    return per_frame


def _flag_identity(params: CleanParams, threshold: float) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """Frame function: each image's leave-one-out angle to its identity's clean group, whether it is
    beyond the threshold, and (on the identity's first row only) the clean group's centre."""

    def per_frame(pdf: pd.DataFrame) -> pd.DataFrame:
        x, slices = _identity_slices(pdf)
        order, angles, far, checked, centres = [], [], [], [], []
        for rows in slices:
            n = len(rows)
            k = ers_math.subcentre_count(n, params.subcenters, params.min_images_per_subcenter)
            keep, angle, centre = ers_math.subcenter_label_noise(x[rows], k=k, max_angle_deg=threshold, seed=params.seed)
            is_checked = n >= params.min_identity_size
            order.append(rows)
            angles.append(angle)
            far.append(~keep & is_checked)
            checked.append(np.full(n, is_checked))
            centres.extend([centre.tolist() if is_checked else None] + [None] * (n - 1))
        at = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
        return pd.DataFrame({IMAGE_ID: pdf[IMAGE_ID].to_numpy()[at], IDENTITY: pdf[IDENTITY].to_numpy()[at],
                             SUBCENTER_ANGLE: np.concatenate(angles) if angles else np.zeros(0),
                             CHECKED: np.concatenate(checked) if checked else np.zeros(0, bool),
                             FAR_FROM_OWN: np.concatenate(far) if far else np.zeros(0, bool),
                             CENTRE: pd.Series(centres, dtype=object)})

    return per_frame


def _block_rows(df: DataFrame, key: str, columns: list[str], block_rows: int) -> DataFrame:
    """``df`` as rows of at most about ``block_rows`` structs each (rows hashed on ``key`` into blocks)."""
    n_blocks = max(1, -(-df.count() // block_rows))
    block = F.pmod(F.xxhash64(F.col(key)), F.lit(n_blocks))
    return df.groupBy(block.alias("_block")).agg(F.collect_list(F.struct(*columns)).alias(key + "_block")).drop("_block")


def _as_dicts(cell) -> list[dict]:
    return [c if isinstance(c, dict) else c.asDict() for c in cell]


def _nearest_in_block_pairs(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """mapInPandas function: for each (candidate block, centre block) row, each candidate's nearest other centre in it."""
    for pdf in batches:
        for images, centres in zip(pdf[IMAGE_ID + "_block"], pdf[IDENTITY + "_block"]):
            images, centres = _as_dicts(images), _as_dicts(centres)
            angles, who = ers_math.nearest_other_centre(
                np.array([r[EMBEDDING] for r in images], dtype=np.float32), [r[IDENTITY] for r in images],
                np.array([r[CENTRE] for r in centres], dtype=np.float32), [r[IDENTITY] for r in centres],
            )
            found = np.isfinite(angles)
            yield pd.DataFrame({IMAGE_ID: np.array([r[IMAGE_ID] for r in images], dtype=object)[found],
                                OTHER_ANGLE: angles[found], OTHER_IDENTITY: who[found]})


def nearest_other_centres(candidates: DataFrame, centres: DataFrame, block_rows: int = CENTRE_BLOCK_ROWS) -> DataFrame:
    """Per candidate image: the angle to, and the name of, the nearest clean centre of another identity.

    Candidates and centres are cut into blocks of about ``block_rows``; every pair of blocks is
    one row of a cross join, so no task holds more than two blocks and nothing proportional to the
    number of identities reaches the driver.
    """
    pairs = _block_rows(candidates, IMAGE_ID, [IMAGE_ID, IDENTITY, EMBEDDING], block_rows).crossJoin(
        _block_rows(centres, IDENTITY, [IDENTITY, CENTRE], block_rows))
    nearest = pairs.mapInPandas(_nearest_in_block_pairs, f"{IMAGE_ID} string, {OTHER_ANGLE} double, {OTHER_IDENTITY} string")
    return nearest.groupBy(IMAGE_ID).agg(F.min(OTHER_ANGLE).alias(OTHER_ANGLE),
                                         F.min_by(OTHER_IDENTITY, OTHER_ANGLE).alias(OTHER_IDENTITY))


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


@dataclasses.dataclass
class LabelNoiseCheck:
    """The label-noise flags of the labelled rows, the two angles that decided them, and what to unpersist."""

    flags: DataFrame | None = None
    max_angle_deg: float | None = None
    claim_angle_deg: float | None = None
    cached: list[DataFrame] = dataclasses.field(default_factory=list)

    def unpersist(self) -> None:
        for df in self.cached:
            df.unpersist()


def identity_sizes(labelled: DataFrame) -> DataFrame:
    """(identity, _n): rows per identity, the one count the calibration, the cap and the split share."""
    return labelled.groupBy(IDENTITY).agg(F.count(F.lit(1)).alias("_n"))


def _far_threshold(labelled: DataFrame, params: CleanParams, sizes: DataFrame) -> float | None:
    """``clean.max_angle_deg``, or the calibrated impostor-angle percentile (None: too few identities).

    Centres are fitted only for the (seeded) identities the calibration samples, on at most
    ``max_identity_rows`` rows each.
    """
    if params.max_angle_deg is not None:
        return params.max_angle_deg
    checked = sizes.where(F.col("_n") >= params.min_identity_size).select(IDENTITY)
    names = seeded_sample(checked, IDENTITY, params.calibration_identities, params.seed)
    fit = capped_rows(labelled.join(names, IDENTITY, "left_semi"), params, sizes)
    centres = _per_identity(fit, _dominant_centres(params), f"{IDENTITY} string, {CENTRE} array<float>")
    return calibrate_threshold(labelled, centres, params)


def capped_rows(labelled: DataFrame, params: CleanParams, sizes: DataFrame | None = None) -> DataFrame:
    """At most about ``max_identity_rows`` seeded rows of each identity (all rows of the smaller ones).

    A row is kept when its id's seeded hash, modulo the identity's size, is below the cap: no
    sort and no window over a large identity.
    """
    sizes = identity_sizes(labelled) if sizes is None else sizes
    slot = F.pmod(F.xxhash64(F.col(IMAGE_ID), F.lit(params.seed)), F.col("_n"))
    return labelled.join(sizes, IDENTITY).where(slot < params.max_identity_rows).drop("_n")


def _split_large_identities(labelled: DataFrame, params: CleanParams,
                            sizes: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(rows of identities up to ``max_identity_rows``, rows of the larger ones)."""
    large = sizes.where(F.col("_n") > params.max_identity_rows).select(IDENTITY)
    return labelled.join(large, IDENTITY, "left_anti"), labelled.join(large, IDENTITY, "left_semi")


def _angles_to_own_centre(threshold: float) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas function: rows of a large identity against its fitted centre (the centre hardly depends on one row)."""

    def batches(pdfs: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in pdfs:
            if not len(pdf):
                continue
            angles = ers_math.row_angles(_embeddings_of(pdf), np.stack(pdf[CENTRE].to_numpy()))
            yield pd.DataFrame({IMAGE_ID: pdf[IMAGE_ID].to_numpy(), IDENTITY: pdf[IDENTITY].to_numpy(),
                                SUBCENTER_ANGLE: angles, CHECKED: True, FAR_FROM_OWN: angles > threshold, CENTRE: None})

    return batches


def _per_image_angles(labelled: DataFrame, params: CleanParams, threshold: float,
                      sizes: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(per image: angle to its identity's clean group and whether it is beyond ``threshold``; centre per identity).

    Identities up to ``max_identity_rows`` rows are checked whole in one call (leave-one-out angles);
    a larger one gets its sub-centres from a capped seeded sample, and its rows are measured against
    that centre in parallel, so no call ever holds more than the cap.
    """
    schema = (f"{IMAGE_ID} string, {IDENTITY} string, {SUBCENTER_ANGLE} double, {CHECKED} boolean, "
              f"{FAR_FROM_OWN} boolean, {CENTRE} array<float>")
    small, large = _split_large_identities(labelled, params, sizes)
    per_small = _per_identity(small, _flag_identity(params, threshold), schema)
    large_centres = _per_identity(capped_rows(large, params, sizes), _dominant_centres(params),
                                  f"{IDENTITY} string, {CENTRE} array<float>")
    per_large = large.join(large_centres, IDENTITY).select(IMAGE_ID, IDENTITY, EMBEDDING, CENTRE).mapInPandas(
        _angles_to_own_centre(threshold), schema)
    per_image = per_small.unionByName(per_large).cache()
    centres = per_image.where(F.col(CENTRE).isNotNull()).select(IDENTITY, CENTRE).unionByName(large_centres)
    return per_image, centres


def _claim_threshold(per_image: DataFrame, params: CleanParams) -> float | None:
    """The ``clean.genuine_percentile``-th percentile of the checked images' angles to their own identity."""
    q = params.genuine_percentile / 100.0
    row = per_image.where(F.col(CHECKED)).agg(F.percentile_approx(SUBCENTER_ANGLE, q, PERCENTILE_ACCURACY).alias("t")).first()
    return None if row["t"] is None else float(row["t"])


def label_noise_flags(labelled: DataFrame, params: CleanParams) -> LabelNoiseCheck:
    """Per labelled image: angle to its identity's clean group, nearest other identity, and the label-noise flag.

    An image is label noise when it is both *far from its own identity* (angle beyond the
    impostor-calibrated or configured threshold) and *claimed by another identity* (as close to
    another identity's clean centre as the ``genuine_percentile``-th percentile of images are to
    their own). A degraded image of the right person is far from every centre and is not flagged.
    An empty check (``flags`` None) when the threshold is to be calibrated and there are fewer
    than two checked identities.
    """
    sizes = identity_sizes(labelled).cache()
    threshold = _far_threshold(labelled, params, sizes)
    if threshold is None:
        sizes.unpersist()
        log.warning("clean: fewer than two identities with >= %d images; label noise not checked", params.min_identity_size)
        return LabelNoiseCheck()
    per_image, centres = _per_image_angles(labelled, params, threshold, sizes)
    claim = _claim_threshold(per_image, params)
    candidates = per_image.where(F.col(FAR_FROM_OWN)).select(IMAGE_ID, IDENTITY).join(labelled.select(IMAGE_ID, EMBEDDING), IMAGE_ID)
    nearest = nearest_other_centres(candidates, centres)
    claimed = F.coalesce(F.col(OTHER_ANGLE) <= F.lit(claim if claim is not None else -1.0), F.lit(False))
    flags = (
        per_image.select(IMAGE_ID, SUBCENTER_ANGLE, FAR_FROM_OWN).join(nearest, IMAGE_ID, "left")
        .withColumn(LABEL_NOISE, F.col(FAR_FROM_OWN) & claimed).drop(FAR_FROM_OWN)
    )
    return LabelNoiseCheck(flags, threshold, claim, [per_image, sizes])


def decide(rows: DataFrame, embeddings: DataFrame, params: CleanParams) -> tuple[DataFrame, LabelNoiseCheck]:
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


def run_clean(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Run the clean stage; counts: scored = cleaned + quarantined (unrecognizable + label_noise)."""
    params = CleanParams.from_config(cfg)
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
    counts = {r[REASON] or "cleaned": int(r["n"]) for r in decided.groupBy(REASON).agg(F.count(F.lit(1)).alias("n")).collect()}
    decided.unpersist()
    check.unpersist()
    scored = sum(counts.values())
    run.params.update(max_angle_deg_applied=check.max_angle_deg, claim_angle_deg_applied=check.claim_angle_deg)
    run.counts = {
        "scored": scored,
        "cleaned": counts.get("cleaned", 0),
        "quarantined": scored - counts.get("cleaned", 0),
        "unrecognizable": counts.get(REASON_UNRECOGNIZABLE, 0),
        "label_noise": counts.get(REASON_LABEL_NOISE, 0),
        **changes,
    }
    if check.max_angle_deg is not None:
        log.info("clean: label noise = farther than %.1f deg from its own identity and within %s deg of another's",
                 check.max_angle_deg, "n/a" if check.claim_angle_deg is None else f"{check.claim_angle_deg:.1f}")
    return run.finish(spark, cfg, outputs=(CLEANED, QUARANTINE))
