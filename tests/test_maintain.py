"""Tables clustered on image_id, and `ers-spark maintain`: OPTIMIZE + VACUUM, same rows, catalog in sync."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chispa import assert_df_equality
from delta.tables import DeltaTable

from ers_spark.errors import ConfigError, ContractError
from ers_spark.lake.contracts import IMAGE_ID, QUARANTINE, RUNS, UI_MEMBERS, UIC_ID
from ers_spark.lake.tables import ensure_table, merge_insert_new, table_path, table_version
from ers_spark.stages.maintain import LISTING_PARALLELISM, RETENTION_CHECK, run_maintain

pytestmark = pytest.mark.spark

NO_RETENTION_CHECK = f'spark.conf={{"{RETENTION_CHECK}": "false"}}'


def _detail(spark, cfg, contract):
    return DeltaTable.forPath(spark, table_path(cfg, contract)).detail().first()


def _files_on_disk(cfg, contract) -> int:
    return len(list(Path(table_path(cfg, contract)).glob("*.parquet")))


def _members(spark, cfg, batches: int, per_batch: int) -> None:
    """ui_members written by several small MERGEs: one or more files each."""
    for b in range(batches):
        rows = [("u1", f"img{b:02d}{i:02d}") for i in range(per_batch)]
        merge_insert_new(spark, cfg, UI_MEMBERS, spark.createDataFrame(rows, UI_MEMBERS.schema).repartition(2))


def _old_quarantine_table(spark, cfg) -> None:
    """A quarantine table as an older ers-spark left it: written without liquid clustering, two appends of one file."""
    row = ("img0", None, "ingest", "undecodable", "x", None, None, None)
    for _ in range(2):
        df = spark.createDataFrame([row], "image_id string, source_path string, stage string, reason string, "
                                          "detail string, ers double, uic_id string, model_version string")
        df.selectExpr("*", "current_timestamp() AS quarantined_at").coalesce(1).write.format("delta").mode("append").save(
            table_path(cfg, QUARANTINE))


def test_new_tables_are_clustered_on_image_id(spark, make_cfg) -> None:
    cfg = make_cfg()
    for contract in (UI_MEMBERS, RUNS):
        ensure_table(spark, cfg, contract)
    assert _detail(spark, cfg, UI_MEMBERS)["clusteringColumns"] == [IMAGE_ID]
    assert _detail(spark, cfg, RUNS)["clusteringColumns"] == []  # no image_id: nothing to cluster on


def test_maintain_compacts_keeps_rows_vacuums_and_keeps_the_catalog(spark, make_cfg, capsys) -> None:
    cfg = make_cfg("maintain.vacuum_retention_hours=0", NO_RETENTION_CHECK)
    _members(spark, cfg, batches=4, per_batch=10)
    _old_quarantine_table(spark, cfg)
    path = table_path(cfg, UI_MEMBERS)
    before = spark.createDataFrame(spark.read.format("delta").load(path).collect(), UI_MEMBERS.schema)
    files_before, version_before = _files_on_disk(cfg, UI_MEMBERS), table_version(spark, cfg, UI_MEMBERS)
    assert files_before >= 4
    session_settings = {key: spark.conf.get(key, None) for key in (RETENTION_CHECK, LISTING_PARALLELISM)}

    record = run_maintain(spark, cfg)

    tables = record["runtime"]["tables"]
    assert sorted(tables) == ["quarantine", "ui_members"]
    members = tables["ui_members"]
    assert (members["files_before"], members["files_after"], members["files_vacuumed"]) == (files_before, 1, files_before)
    assert members["version_before"] == version_before == record["input_versions"]["ui_members"]
    assert members["version_after"] == record["output_versions"]["ui_members"] > version_before
    assert _files_on_disk(cfg, UI_MEMBERS) == 1  # VACUUM with retention 0 removed every replaced file
    after = spark.read.format("delta").load(path)
    assert_df_equality(after, before, ignore_row_order=True, ignore_nullable=True)
    assert tables["quarantine"]["clustering_enabled"] is True and members["clustering_enabled"] is False
    assert _detail(spark, cfg, QUARANTINE)["clusteringColumns"] == [IMAGE_ID]
    assert record["counts"] == {"tables": 2, "files_before": files_before + 2, "files_after": 2,
                                "files_vacuumed": files_before + 2, "clustering_enabled": 1}
    assert spark.sql(f"SELECT count(*) FROM {cfg.storage.database}.ui_members").first()[0] == 40
    assert spark.sql(f"SELECT count(*) FROM {cfg.storage.database}.quarantine").first()[0] == 2
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.strip()]  # VACUUM's own line went to stderr
    assert json.loads(line)["stage"] == "maintain"
    assert {key: spark.conf.get(key, None) for key in session_settings} == session_settings  # restored


def test_maintain_refuses_a_retention_delta_refuses_before_touching_a_table(spark, make_cfg) -> None:
    cfg = make_cfg("maintain.vacuum_retention_hours=24")
    _members(spark, cfg, batches=1, per_batch=3)
    version = table_version(spark, cfg, UI_MEMBERS)
    with pytest.raises(ConfigError) as err:
        run_maintain(spark, cfg)
    assert str(err.value) == (
        "maintain.vacuum_retention_hours=24 is below Delta's minimum retention (168 h, "
        "delta.deletedFileRetentionDuration): a running job may still read those files; raise it, or, when no "
        f"other job uses the lake, set spark.conf \"{RETENTION_CHECK}\": \"false\" (in {cfg.source})"
    )
    assert table_version(spark, cfg, UI_MEMBERS) == version


def test_maintain_on_an_empty_lake_says_so(spark, make_cfg) -> None:
    cfg = make_cfg()
    with pytest.raises(ContractError) as err:
        run_maintain(spark, cfg)
    assert str(err.value) == (
        f"no ers-spark table under {cfg.storage.table_path('')}: nothing to maintain (check storage.root)"
    )


def test_default_retention_keeps_recent_files(spark, make_cfg) -> None:
    """With the default 168 h nothing written minutes ago is deleted, and time travel still works."""
    cfg = make_cfg()
    _members(spark, cfg, batches=2, per_batch=5)
    files = _files_on_disk(cfg, UI_MEMBERS)
    record = run_maintain(spark, cfg)
    assert record["params"] == {"vacuum_retention_hours": 168.0, "retention_check": True}
    assert record["runtime"]["tables"]["ui_members"]["files_vacuumed"] == 0
    assert _files_on_disk(cfg, UI_MEMBERS) == files + 1  # the compacted file next to the replaced ones
    first = spark.read.format("delta").option("versionAsOf", 1).load(table_path(cfg, UI_MEMBERS))
    assert first.where(f"{UIC_ID} = 'u1'").count() == 5
