"""Recognition protocols' Spark side, beside :mod:`ers_spark.core.metrics`: the 1:N gallery search (a join for the
mate, cells over the gallery for the best other identity; per-probe aggregates alone come back) and templates pooled per identity in the Python
workers with every weighting of :func:`ers_spark.core.metrics.pool_template`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

from ers_spark.config import EvaluateConfig
from ers_spark.core import metrics
from ers_spark.distributed.calibration import CALIBRATION, NONMATED
from ers_spark.distributed.identity_index import OTHER_COS, nearest_other_entries
from ers_spark.distributed.pairs import dot
from ers_spark.distributed.sampling import seeded_hash, seeded_sample
from ers_spark.lake.contracts import EMBEDDING, ERS, IDENTITY, IMAGE_ID

TEMPLATE = "template"
VECTOR = "vector"


def identification_probes(images: DataFrame, params: EvaluateConfig) -> pd.DataFrame:
    """Per probe of the evaluation identities: mated?, rank-1 mate score (null if not first), top score, ERS.

    Gallery: one enrolment image per non-left-out identity (highest ERS, or seeded random). A probe's mate
    score is a join on its identity; its best score of another identity comes through cells over the
    gallery (:mod:`ers_spark.distributed.identity_index`: exact up to 8,192 gallery identities, then each
    probe searches its nearest cells), so nothing grows as probes x identities. Only the per-probe
    aggregates come back, at most ``max_probes``.
    """
    ev = images.where(F.col(IDENTITY).isNotNull() & ~F.col(CALIBRATION))
    key = (F.col(ERS).desc(),) if params.enrolment == "best_ers" else (seeded_hash(params.seed, F.lit("enrol"), IMAGE_ID),)
    enrol_rank = F.row_number().over(Window.partitionBy(IDENTITY).orderBy(*key, IMAGE_ID))
    ev = ev.withColumn("_enrol", ~F.col(NONMATED) & (enrol_rank == 1))
    gallery = ev.where("_enrol").select(IDENTITY, EMBEDDING)
    probes = seeded_sample(ev.where(~F.col("_enrol")), IMAGE_ID, params.max_probes, params.seed, salt="probe")
    probes = probes.select(IMAGE_ID, IDENTITY, EMBEDDING, ERS, NONMATED)
    mates = probes.join(gallery.withColumnRenamed(EMBEDDING, "g_embedding"), IDENTITY, "left")
    mates = mates.select(IMAGE_ID, NONMATED, ERS, dot(EMBEDDING, "g_embedding").alias("mate"))
    others = nearest_other_entries(probes, IMAGE_ID, EMBEDDING, gallery, EMBEDDING, seed=params.seed)
    per_probe = mates.join(others, IMAGE_ID, "left").withColumn("top", F.greatest("mate", OTHER_COS))
    rank1 = F.when(F.col("mate") >= F.col("top"), F.col("mate"))
    return per_probe.select(IMAGE_ID, NONMATED, rank1.alias("mate_rank1"), "top", ERS).toPandas().sort_values(IMAGE_ID)


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
