"""Seeded sampling of a DataFrame: the driver-side samples of the eps rule, the quantiser and sample-hac, and
the seeded hash that orders (and so draws) rows, pairs and identities reproducibly.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F


def uniform_sample(df: DataFrame, n_rows: int, at_most: int, seed: int) -> DataFrame:
    """A deterministic uniform sample of at most ``at_most`` rows (all rows when small)."""
    if n_rows <= at_most:
        return df
    frac = min(1.0, 1.1 * at_most / n_rows)  # Bernoulli sample a bit above the target, then cap
    return df.sample(withReplacement=False, fraction=frac, seed=seed).limit(at_most)


def seeded_hash(seed: int, *columns: str | F.Column) -> F.Column:
    return F.xxhash64(F.lit(seed), *[F.col(c) if isinstance(c, str) else c for c in columns])
