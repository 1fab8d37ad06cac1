"""Seeded samples without a global sort: the rows with the smallest seeded hash, whatever the partitioning,
chosen by a hash threshold before the cap (no task gathers ``cap`` rows from every partition)."""

from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from ers_spark.distributed.sampling import hash_threshold, sample_share, seeded_sample, uniform_sample

pytestmark = pytest.mark.spark


def _ids(df) -> list[str]:
    return sorted(r.image_id for r in df.collect())


def _smallest_hashes(df, key: str, cap: int, seed: int) -> list[str]:
    """Brute force: every row's hash on the driver, sorted, the first ``cap``."""
    rows = df.select(key, F.xxhash64(F.col(key).cast("string"), F.lit(seed)).alias("h")).collect()
    return sorted(r[key] for r in sorted(rows, key=lambda r: (r["h"], r[key]))[:cap])


def test_seeded_sample_is_random_capped_and_deterministic(spark) -> None:
    """Not the first rows: a seeded choice that changes with the seed and spreads over the whole range."""
    df = spark.range(1000).selectExpr("cast(id as string) as image_id")
    first = [r.image_id for r in df.limit(100).collect()]
    picked = _ids(seeded_sample(df, "image_id", 100, seed=0))
    assert len(picked) == 100 and picked != sorted(first)
    assert _ids(seeded_sample(df, "image_id", 100, seed=1)) != picked
    assert 30 < sum(int(i) < 500 for i in picked) < 70


@pytest.mark.parametrize(("rows", "cap", "partitions"), [(5000, 40, 1), (5000, 40, 13), (5000, 700, 7), (300, 500, 4)])
def test_seeded_sample_is_the_smallest_hashes_whatever_the_partitioning(spark, rows, cap, partitions) -> None:
    df = spark.range(rows).selectExpr("cast(id * 7919 as string) as image_id").repartition(partitions)
    expected = _smallest_hashes(df, "image_id", cap, seed=3)
    assert _ids(seeded_sample(df, "image_id", cap, seed=3)) == expected
    assert _ids(seeded_sample(df, "image_id", cap, seed=3, n_rows=rows)) == expected
    assert _ids(uniform_sample(df, rows, cap, seed=3)) == expected


def test_the_cap_sorts_only_the_rows_under_the_hash_threshold(spark) -> None:
    """The plan: a filter on the seeded hash under the top-k, so 40 partitions send about ``cap`` rows in all
    to the task that caps them, not ``cap`` rows each; the rows that reach it are counted."""
    rows, cap = 20_000, 500
    df = spark.range(rows).selectExpr("cast(id as string) as image_id").repartition(40)
    sample = seeded_sample(df, "image_id", cap, seed=0, n_rows=rows)
    plan = sample._jdf.queryExecution().executedPlan().toString()
    top_k = plan.index("TakeOrderedAndProject")
    assert "Filter (xxhash64(" in plan[top_k:], plan
    threshold = hash_threshold(sample_share(rows, cap))
    reaching = df.where(F.xxhash64("image_id", F.lit(0)) < F.lit(threshold)).count()
    assert cap <= reaching < 2 * cap  # about cap in all, never 40 x cap
    assert sample.count() == cap


def test_hash_threshold_and_share() -> None:
    assert hash_threshold(0.25) == -(2**62)
    assert sample_share(1_000, 1_000) == 1.0 and sample_share(10**9, 20_000) < 2.2e-5
