"""Calibration samples on Spark, the distributed side of :mod:`ers_spark.core.calibration`: the labelled rows
that score calibrates gamma on, drawn by identity so that they hold genuine pairs, and evaluate's split
of the identities into calibration and evaluation ones.
"""

from __future__ import annotations

import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from ers_spark.config import ErsConfig, EvaluateConfig, ScoreConfig
from ers_spark.lake.contracts import EMBEDDING, IDENTITY, IMAGE_ID, LABEL_TABLES
from ers_spark.distributed.sampling import seeded_hash, seeded_sample
from ers_spark.lake.tables import image_labels, table_exists

# the columns of identity_roles
CALIBRATION = "calibration"
NONMATED = "nonmated"

IMAGES_PER_IDENTITY = 10  # calibration draws up to this many images of each sampled identity (45 genuine pairs)


def identity_sample(spark: SparkSession, cfg: ErsConfig, embeddings: DataFrame, params: ScoreConfig) -> pd.DataFrame:
    """Labelled rows for calibration, drawn by identity: the first identities (2+ images) in seeded hash order,
    up to ``IMAGES_PER_IDENTITY`` images each, at most ``calibration_sample_rows`` rows in all.

    Why by identity: a uniform row sample of a set with many identities holds almost no genuine pairs.
    Only the sampled rows reach the driver; nothing counts the whole table first.
    """
    if not any(table_exists(spark, cfg, c) for c in LABEL_TABLES):
        return pd.DataFrame(columns=[IMAGE_ID, EMBEDDING, IDENTITY])
    labels = image_labels(spark, cfg).where(F.col(IDENTITY).isNotNull()).select(IMAGE_ID, IDENTITY)
    labelled = embeddings.select(IMAGE_ID, EMBEDDING).join(labels, IMAGE_ID)
    n_identities = max(2, params.calibration_sample_rows // IMAGES_PER_IDENTITY)
    chosen = seeded_sample(labelled.groupBy(IDENTITY).count().where(F.col("count") >= 2), IDENTITY, n_identities, params.seed)
    order = Window.partitionBy(IDENTITY).orderBy(F.xxhash64(IMAGE_ID, F.lit(params.seed)), IMAGE_ID)
    rows = (labelled.join(F.broadcast(chosen.select(IDENTITY)), IDENTITY)
            .withColumn("_k", F.row_number().over(order)).where(F.col("_k") <= IMAGES_PER_IDENTITY).drop("_k"))
    return rows.toPandas()


def calibration_identity(identity: F.Column, share: float, seed: int) -> F.Column:
    """Whether an identity is drawn for calibration: the same draw as
    :func:`ers_spark.core.calibration.calibration_identities` (the first 8 bytes of
    ``sha256("{seed}:{name}")`` as a fraction of 2**64, below ``share``), so score's held-out check and
    evaluate split the identities alike, row by row, with no window and nothing on the driver.
    """
    digest = F.sha2(F.concat(F.lit(f"{seed}:"), identity.cast("string")), 256)
    top = F.conv(F.substring(digest, 1, 16), 16, 10).cast("decimal(20,0)").cast("double")
    return (top / F.lit(2.0**64)) < F.lit(float(share))


def identity_roles(images: DataFrame, params: EvaluateConfig) -> DataFrame:
    """Per identity: calibration (gamma is chosen on it) or evaluation; some evaluation ones left out of the gallery.

    The calibration identities are :func:`calibration_identity`'s (score's split too); of the others,
    the first ``nonmated_identity_share`` in seeded hash order are the 1:N non-mated identities.
    """
    ids = (images.where(F.col(IDENTITY).isNotNull()).select(IDENTITY).distinct()
           .withColumn(CALIBRATION, calibration_identity(F.col(IDENTITY), params.calibration_share, params.seed)))
    n_nonmated = int(round(params.nonmated_identity_share * ids.where(~F.col(CALIBRATION)).count()))
    order = Window.partitionBy(CALIBRATION).orderBy(seeded_hash(params.seed, F.lit("split"), IDENTITY), IDENTITY)
    rank = F.row_number().over(order)
    return ids.select(IDENTITY, CALIBRATION, (~F.col(CALIBRATION) & (rank <= n_nonmated)).alias(NONMATED))
