"""Seeded sampling of a DataFrame: the driver-side samples of the eps rule, the quantiser, sample-hac and the
calibrations, and the seeded hash that orders (and so draws) rows, pairs and identities reproducibly.

Every sample is the rows with the smallest seeded hash of their key, chosen by a hash threshold and then
capped: the same rows whatever the partitioning, and no task ever gathers ``cap`` rows from every partition.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ers_spark.lake.contracts import IMAGE_ID


def hash_threshold(fraction: float) -> int:
    """The signed 64-bit value below which a share ``fraction`` of uniform 64-bit hashes fall.

    >>> hash_threshold(0.5), hash_threshold(1.0) == 2**63 - 1, hash_threshold(0.0) == -2**63
    (0, True, True)
    """
    return int(min(2**63 - 1, max(-(2**63), -(2**63) + round(fraction * 2.0**64))))


def sample_share(n_rows: int, cap: int) -> float:
    """The share of ``n_rows`` a hash threshold keeps so that at least ``cap`` pass but for a 1e-9 chance.

    The count that passes is binomial with mean ``n * share``; the margin is six of its standard
    deviations, plus 16 rows for tiny caps, so the capped sample is the ``cap`` smallest hashes.

    >>> sample_share(10_000_000, 20_000) < 0.0021, sample_share(100, 20_000)
    (True, 1.0)
    """
    if n_rows <= cap:
        return 1.0
    return min(1.0, (cap + 6.0 * cap**0.5 + 16) / n_rows)


def seeded_sample(df: DataFrame, key: str, cap: int, seed: int, n_rows: int | None = None,
                  salt: str | None = None) -> DataFrame:
    """At most ``cap`` rows: those whose seeded hash of ``key`` (and ``salt``, to draw another sample of the same
    rows) is smallest, fixed by ``seed`` and the keys, never by the rows' order or partitioning.

    No global sort of the table: a threshold on the hash (:func:`sample_share` of the rows, counted
    when ``n_rows`` is not given) keeps about ``cap`` rows of all partitions together, so the top-``cap``
    that follows sorts those, not ``cap`` rows from each partition. The rows are the ``cap`` smallest hashes,
    as a sort of the whole table would give; only with a chance under 1e-9 (fewer rows passed) a few less.
    """
    rank = (F.xxhash64(F.col(key).cast("string"), F.lit(seed)) if salt is None
            else seeded_hash(seed, F.lit(salt), key))
    n = df.count() if n_rows is None else n_rows
    share = sample_share(n, cap)
    kept = df if share >= 1.0 else df.where(rank < F.lit(hash_threshold(share)))
    return kept.orderBy(rank, key).limit(cap)


def uniform_sample(df: DataFrame, n_rows: int, at_most: int, seed: int) -> DataFrame:
    """A deterministic uniform sample of at most ``at_most`` rows (all rows when small): the rows whose seeded
    hash of ``image_id`` is smallest, the same whatever the partitioning (no global sort, see
    :func:`ers_spark.lake.tables.seeded_sample`)."""
    return seeded_sample(df, IMAGE_ID, at_most, seed, n_rows=n_rows)


def seeded_hash(seed: int, *columns: str | F.Column) -> F.Column:
    return F.xxhash64(F.lit(seed), *[F.col(c) if isinstance(c, str) else c for c in columns])
