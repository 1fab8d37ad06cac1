"""Comparison pairs on Spark, the distributed side of :mod:`ers_spark.core.pairs`: genuine pairs within
identities (capped per identity, seeded), impostor pairs by seeded random blocking (never a full
cross join), a user's pairs resolved to image ids, and every pair scored where the embeddings are,
so that only a few floats per pair reach the driver.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from ers_spark.distributed.calibration import CALIBRATION
from ers_spark.distributed.sampling import seeded_hash
from ers_spark.lake.contracts import EMBEDDING, ERS, IDENTITY, IMAGE_ID, RAW_NORM, SOURCE_PATH

# working columns
ITEM = "item"
A, B = "a", "b"
SAME = "same"
SIM = "sim"


def dot(left: str, right: str) -> F.Column:
    """Inner product of two array columns, evaluated by Spark (unit embeddings: cosine similarity)."""
    products = F.zip_with(F.col(left), F.col(right), lambda x, y: x * y)
    return F.aggregate(products, F.lit(0.0), lambda acc, x: acc + x).cast("double")


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
