"""Sub-centres and label noise on Spark, the distributed side of :mod:`ers_spark.core.subcentres`.

Per identity, sub-centres are fitted in the Python workers on frames of whole identities (many
identities per call; an identity above ``clean.max_identity_rows`` is fitted on a capped seeded
sample and its rows measured against that centre in parallel); the impostor-angle threshold is
calibrated on capped seeded samples; the nearest clean centre of another identity is found through
cells over the centres (:mod:`ers_spark.distributed.identity_index`). Only thresholds and the sampled centres reach the driver.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ers_spark.config import CleanConfig
from ers_spark.core import subcentres
from ers_spark.lake.contracts import EMBEDDING, IDENTITY, IMAGE_ID, SUBCENTER_ANGLE
from ers_spark.distributed.identity_index import OTHER_COS, nearest_other_entries
from ers_spark.distributed.identity_index import OTHER_IDENTITY as INDEX_OTHER_IDENTITY
from ers_spark.distributed.sampling import seeded_sample

log = logging.getLogger(__name__)

LABEL_NOISE = "_label_noise"
CENTRE = "_centre"
IMPOSTOR_ANGLE = "impostor_angle_deg"
CHECKED = "_checked"
FAR_FROM_OWN = "_far_from_own"
OTHER_ANGLE = "_other_angle_deg"
OTHER_IDENTITY = "_other_identity"
PERCENTILE_ACCURACY = 10000  # percentile_approx: rank error <= 1/10000 of the sampled angles


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
    images; a sorted partition cut into whole identities keeps the calls per Arrow batch. Each
    identity's rows arrive in image_id order, whatever order the shuffle delivered them in: the
    k-means start depends on row order, so a recompute (a lost cache, a retried task) decides the same.
    """
    by_identity = labelled.repartition(IDENTITY).sortWithinPartitions(IDENTITY, IMAGE_ID)
    return by_identity.mapInPandas(lambda pdfs: (per_frame(pdf) for pdf in whole_identity_frames(pdfs)), schema)


def _identity_slices(pdf: pd.DataFrame) -> tuple[np.ndarray, list[np.ndarray]]:
    """(embeddings of the frame, row positions of each identity in it)."""
    return _embeddings_of(pdf), list(pdf.groupby(IDENTITY, sort=False, dropna=False).indices.values())


def _dominant_centres(params: CleanConfig) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """Frame function: one row per checked identity with its dominant sub-centre."""

    def per_frame(pdf: pd.DataFrame) -> pd.DataFrame:
        x, slices = _identity_slices(pdf)
        names, centres = [], []
        for rows in (r for r in slices if len(r) >= params.min_identity_size):
            k = subcentres.subcentre_count(len(rows), params.subcenters, params.min_images_per_subcenter)
            centre, _, _ = subcentres.dominant_subcentre(x[rows], k, seed=params.seed)
            names.append(pdf[IDENTITY].iloc[rows[0]])
            centres.append(centre.tolist())
        return pd.DataFrame({IDENTITY: pd.Series(names, dtype=object), CENTRE: pd.Series(centres, dtype=object)})

    return per_frame


def _flag_identity(params: CleanConfig, threshold: float) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """Frame function: each image's leave-one-out angle to its identity's clean group, whether it is
    beyond the threshold, and (on the identity's first row only) the clean group's centre."""

    def per_frame(pdf: pd.DataFrame) -> pd.DataFrame:
        x, slices = _identity_slices(pdf)
        order, angles, far, checked, centres = [], [], [], [], []
        for rows in slices:
            n = len(rows)
            k = subcentres.subcentre_count(n, params.subcenters, params.min_images_per_subcenter)
            keep, angle, centre = subcentres.subcenter_label_noise(x[rows], k=k, max_angle_deg=threshold, seed=params.seed)
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


def nearest_other_centres(candidates: DataFrame, centres: DataFrame, seed: int) -> DataFrame:
    """Per candidate image: the angle to, and the name of, the nearest clean centre of another identity.

    Through cells over the centres (:mod:`ers_spark.distributed.identity_index`): each candidate meets the
    centres of its few nearest cells, so the shuffle grows as candidates x a constant, not candidates x
    identities, and nothing proportional to the identities reaches the driver.
    """
    nearest = nearest_other_entries(candidates, IMAGE_ID, EMBEDDING, centres, CENTRE, seed=seed)
    angle = F.degrees(F.acos(F.least(F.lit(1.0), F.greatest(F.lit(-1.0), F.col(OTHER_COS)))))
    return nearest.select(IMAGE_ID, angle.alias(OTHER_ANGLE), F.col(INDEX_OTHER_IDENTITY).alias(OTHER_IDENTITY))


def _impostor_angle_batches(centres: np.ndarray, centre_identity: np.ndarray):
    """mapInPandas function: every impostor angle of a batch of sampled images against the sampled centres."""

    def batches(pdfs: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in pdfs:
            if len(pdf):
                angles = subcentres.impostor_angles(_embeddings_of(pdf), pdf[IDENTITY].to_numpy(), centres, centre_identity)
                yield pd.DataFrame({IMPOSTOR_ANGLE: angles})

    return batches


def calibrate_threshold(labelled: DataFrame, centres: DataFrame, params: CleanConfig) -> float | None:
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


@dataclass
class LabelNoiseCheck:
    """The label-noise flags of the labelled rows, the two angles that decided them, and what to unpersist."""

    flags: DataFrame | None = None
    max_angle_deg: float | None = None
    claim_angle_deg: float | None = None
    cached: list[DataFrame] = field(default_factory=list)

    def unpersist(self) -> None:
        for df in self.cached:
            df.unpersist()


def identity_sizes(labelled: DataFrame) -> DataFrame:
    """(identity, _n): rows per identity, the one count the calibration, the cap and the split share."""
    return labelled.groupBy(IDENTITY).agg(F.count(F.lit(1)).alias("_n"))


def _far_threshold(labelled: DataFrame, params: CleanConfig, sizes: DataFrame) -> float | None:
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


def capped_rows(labelled: DataFrame, params: CleanConfig, sizes: DataFrame | None = None) -> DataFrame:
    """At most about ``max_identity_rows`` seeded rows of each identity (all rows of the smaller ones).

    A row is kept when its id's seeded hash, modulo the identity's size, is below the cap: no
    sort and no window over a large identity.
    """
    sizes = identity_sizes(labelled) if sizes is None else sizes
    slot = F.pmod(F.xxhash64(F.col(IMAGE_ID), F.lit(params.seed)), F.col("_n"))
    return labelled.join(sizes, IDENTITY).where(slot < params.max_identity_rows).drop("_n")


def _split_large_identities(labelled: DataFrame, params: CleanConfig,
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
            angles = subcentres.row_angles(_embeddings_of(pdf), np.stack(pdf[CENTRE].to_numpy()))
            yield pd.DataFrame({IMAGE_ID: pdf[IMAGE_ID].to_numpy(), IDENTITY: pdf[IDENTITY].to_numpy(),
                                SUBCENTER_ANGLE: angles, CHECKED: True, FAR_FROM_OWN: angles > threshold, CENTRE: None})

    return batches


def _per_image_angles(labelled: DataFrame, params: CleanConfig, threshold: float,
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


def _claim_threshold(per_image: DataFrame, params: CleanConfig) -> float | None:
    """The ``clean.genuine_percentile``-th percentile of the checked images' angles to their own identity."""
    q = params.genuine_percentile / 100.0
    row = per_image.where(F.col(CHECKED)).agg(F.percentile_approx(SUBCENTER_ANGLE, q, PERCENTILE_ACCURACY).alias("t")).first()
    return None if row["t"] is None else float(row["t"])


def label_noise_flags(labelled: DataFrame, params: CleanConfig) -> LabelNoiseCheck:
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
    nearest = nearest_other_centres(candidates, centres, params.seed)
    claimed = F.coalesce(F.col(OTHER_ANGLE) <= F.lit(claim if claim is not None else -1.0), F.lit(False))
    flags = (
        per_image.select(IMAGE_ID, SUBCENTER_ANGLE, FAR_FROM_OWN).join(nearest, IMAGE_ID, "left")
        .withColumn(LABEL_NOISE, F.col(FAR_FROM_OWN) & claimed).drop(FAR_FROM_OWN)
    )
    return LabelNoiseCheck(flags, threshold, claim, [per_image, sizes])
