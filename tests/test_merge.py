"""Each MERGE evaluates its source once: a Python UDF in the source counts its rows through an Accumulator.

merge_sync's no-op check reads its source, Delta's MERGE reads it again, and so does a conflict retry; an
embed or score source costs a model run or a shuffle per read unless it is materialised once.
"""

from __future__ import annotations

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

import ers_spark.lake.tables as tables
from ers_spark.lake.contracts import IMAGE_ID, TableContract
from ers_spark.lake.tables import merge_insert_new, merge_sync, table_path, table_version

pytestmark = pytest.mark.spark

PROBE = TableContract(
    "merge_probe", StructType([StructField(IMAGE_ID, StringType(), False), StructField("value", StringType(), True)])
)


def counted_source(spark, ids: list[str], value: str):
    """(rows of ``ids`` whose ``value`` a Python UDF computes, the Accumulator counting the UDF's calls)."""
    calls = spark.sparkContext.accumulator(0)

    def compute(image_id):  # no type hints: PySpark would read them as a pandas UDF's
        calls.add(1)
        return value

    udf = F.udf(compute, StringType())
    rows = spark.createDataFrame([(i,) for i in ids], f"{IMAGE_ID} string").repartition(2)
    return rows.select(IMAGE_ID, udf(IMAGE_ID).alias("value")), calls


def _ids(start: int, stop: int) -> list[str]:
    return [f"img{i:03d}" for i in range(start, stop)]


def _table(spark, cfg):
    return spark.read.format("delta").load(table_path(cfg, PROBE)).orderBy(IMAGE_ID)


def _expected(spark, ids: list[str], value: str):
    return spark.createDataFrame([(i, value) for i in ids], PROBE.schema).orderBy(IMAGE_ID)


def test_merge_sync_evaluates_its_source_once_per_call(spark, make_cfg) -> None:
    cfg = make_cfg()
    source, calls = counted_source(spark, _ids(0, 40), "a")
    assert merge_sync(spark, cfg, PROBE, source, compare=("value",)) == {"inserted": 40, "updated": 0, "deleted": 0}
    assert calls.value == 40

    source, calls = counted_source(spark, _ids(0, 40), "a")  # nothing changes: checked, no MERGE, no new version
    version = table_version(spark, cfg, PROBE)
    assert merge_sync(spark, cfg, PROBE, source, compare=("value",)) == {"inserted": 0, "updated": 0, "deleted": 0}
    assert calls.value == 40 and table_version(spark, cfg, PROBE) == version

    source, calls = counted_source(spark, _ids(10, 40), "b")  # 30 updated, 10 deleted by the scope
    changes = merge_sync(spark, cfg, PROBE, source, compare=("value",), delete_scope="true")
    assert changes == {"inserted": 0, "updated": 30, "deleted": 10}
    assert calls.value == 30
    assert_df_equality(_table(spark, cfg), _expected(spark, _ids(10, 40), "b"), ignore_nullable=True)


def test_merge_insert_new_evaluates_its_source_once(spark, make_cfg) -> None:
    cfg = make_cfg()
    source, calls = counted_source(spark, _ids(0, 40), "a")
    assert merge_insert_new(spark, cfg, PROBE, source) == 40
    assert calls.value == 40
    source, calls = counted_source(spark, _ids(20, 60), "a")
    assert merge_insert_new(spark, cfg, PROBE, source) == 20
    assert calls.value == 40
    assert_df_equality(_table(spark, cfg), _expected(spark, _ids(0, 60), "a"), ignore_nullable=True)


class ConcurrentAppendException(Exception):
    """Named like Delta's conflict, which retry_on_conflict matches by class name."""


def test_a_retried_merge_reads_the_materialised_source(spark, make_cfg, monkeypatch) -> None:
    """A MERGE that loses a race runs again on the new snapshot from the checkpoint, not from the source's plan."""
    cfg = make_cfg()
    real = tables._merge_sync_once
    attempts = []

    def lose_the_first_race(spark_, cfg_, contract, source, compare, delete_scope):
        attempts.append(source.count())  # reads the whole materialised source, as a MERGE pass would
        if len(attempts) == 1:
            raise ConcurrentAppendException("another writer committed first")
        return real(spark_, cfg_, contract, source, compare, delete_scope)

    monkeypatch.setattr(tables, "_merge_sync_once", lose_the_first_race)
    source, calls = counted_source(spark, _ids(0, 25), "a")
    assert merge_sync(spark, cfg, PROBE, source, compare=("value",)) == {"inserted": 25, "updated": 0, "deleted": 0}
    assert attempts == [25, 25] and calls.value == 25
    assert_df_equality(_table(spark, cfg), _expected(spark, _ids(0, 25), "a"), ignore_nullable=True)
