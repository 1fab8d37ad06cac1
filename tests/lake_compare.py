"""Two lakes of the same input, compared table by table (a cluster run against the local[2] run).

Exact columns with chispa; embeddings and ERS within 1e-5 (float sums in another order). Used by the
multi-host tests and bench/cluster_s3.py.
"""

from __future__ import annotations

import numpy as np
from chispa import assert_df_equality

EXACT_COLUMNS = {
    "crops": ["image_id", "source_path", "identity", "width", "height", "format"],
    "scores": ["image_id", "recognizable"],
    "cleaned": ["image_id", "identity"],
    "quarantine": ["image_id", "stage", "reason"],
    "ui_members": ["image_id"],
}
CLOSE_COLUMNS = {"embeddings": "embedding", "scores": "ers"}


def _read(spark, root, table: str):
    return spark.read.format("delta").load(f"{str(root).rstrip('/')}/{table}")


def _assert_exact(spark, got_root, expected_root, table: str) -> None:
    columns = EXACT_COLUMNS[table]
    got = _read(spark, got_root, table).select(*columns).orderBy(*columns)
    expected = _read(spark, expected_root, table).select(*columns).orderBy(*columns)
    assert_df_equality(got, expected, ignore_nullable=True)


def _assert_close(spark, got_root, expected_root, table: str) -> None:
    column = CLOSE_COLUMNS[table]
    got = _read(spark, got_root, table).select("image_id", column).toPandas().sort_values("image_id")
    expected = _read(spark, expected_root, table).select("image_id", column).toPandas().sort_values("image_id")
    assert list(got.image_id) == list(expected.image_id), table
    np.testing.assert_allclose(np.stack(got[column]), np.stack(expected[column]), atol=1e-5)


def _checks():
    yield from ((table, _assert_exact, table) for table in EXACT_COLUMNS)
    yield from ((f"{table}.{column}", _assert_close, table) for table, column in CLOSE_COLUMNS.items())


def assert_lakes_equal(spark, got_root, expected_root) -> None:
    """Fail on the first table where ``got_root``'s lake differs from ``expected_root``'s."""
    for _, check, table in _checks():
        check(spark, got_root, expected_root, table)


def lakes_equal(spark, got_root, expected_root) -> dict[str, bool]:
    """Per table, whether the two lakes agree (the benchmark records this instead of failing)."""
    equal = {}
    for name, check, table in _checks():
        try:
            check(spark, got_root, expected_root, table)
            equal[name] = True
        except AssertionError:
            equal[name] = False
    return equal
