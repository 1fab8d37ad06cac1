"""Delta I/O helpers: table versions and properties, through the Delta log and through the public fallback."""

from __future__ import annotations

import pytest

import ers_spark.lake.tables as ers_io
from ers_spark.lake.contracts import RUNS
from ers_spark.lake.tables import StageRun, ensure_table, set_properties, table_path, table_properties, table_version


@pytest.fixture(params=["delta-log", "public-api"])
def snapshot_route(request, monkeypatch):
    """Run each test through the JVM DeltaLog snapshot and through history()/detail()."""
    if request.param == "public-api":
        monkeypatch.setattr(ers_io, "_delta_snapshot", lambda spark, path: None)
    return request.param


def test_table_version_absent_then_counts_commits(spark, make_cfg, snapshot_route) -> None:
    cfg = make_cfg()
    assert table_version(spark, cfg, RUNS) is None
    ensure_table(spark, cfg, RUNS)
    assert table_version(spark, cfg, RUNS) == 0
    StageRun("test", params={}).finish(spark, cfg)  # appends one row to the runs table
    assert table_version(spark, cfg, RUNS) == 1


def test_properties_read_and_set_only_when_changed(spark, make_cfg, snapshot_route) -> None:
    cfg = make_cfg()
    ensure_table(spark, cfg, RUNS, properties={"ers.model_version": "1"})
    path = table_path(cfg, RUNS)
    assert table_properties(spark, path, ["ers.model_version", "ers.unset"]) == {
        "ers.model_version": "1",
        "ers.unset": None,
    }
    version = table_version(spark, cfg, RUNS)
    set_properties(spark, cfg, RUNS, {"ers.model_version": "1"})
    assert table_version(spark, cfg, RUNS) == version  # unchanged: no new commit
    set_properties(spark, cfg, RUNS, {"ers.model_version": "2"})
    assert table_version(spark, cfg, RUNS) == version + 1
    assert table_properties(spark, path, ["ers.model_version"]) == {"ers.model_version": "2"}
