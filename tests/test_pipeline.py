"""The whole pipeline on the demo data: ingest -> embed -> locate-ui -> score -> clean, re-runs, SQL from the README."""

from __future__ import annotations

import numpy as np
import pytest

from ers_spark.pipeline import run_pipeline
from ers_spark.lake.contracts import CLEANED, CROPS, EMBEDDINGS, SCORES, UI_CENTROIDS, UI_MEMBERS
from ers_spark.lake.tables import table_path, table_version
from ers_spark.sql import run_sql
from readme_queries import pipeline_queries

pytestmark = pytest.mark.spark

def test_demo_pipeline_writes_every_table(spark, demo_lake, capsys) -> None:
    cfg, records = demo_lake
    assert [r["stage"] for r in records] == ["ingest", "embed", "locate-ui", "score", "clean"]
    crops = spark.read.format("delta").load(table_path(cfg, CROPS))
    assert crops.count() == records[0]["counts"]["written"] > 200
    embeddings = spark.read.format("delta").load(table_path(cfg, EMBEDDINGS)).select("image_id", "embedding").toPandas()
    assert len(embeddings) == embeddings.image_id.nunique() == crops.count()  # one unit vector per crop
    np.testing.assert_allclose(np.linalg.norm(np.stack(embeddings.embedding.to_numpy()), axis=1), 1.0, atol=1e-5)
    assert spark.read.format("delta").load(table_path(cfg, UI_CENTROIDS)).count() == 1
    clean = records[-1]["counts"]
    assert clean["scored"] == clean["cleaned"] + clean["quarantined"] == crops.count()
    assert spark.read.format("delta").load(table_path(cfg, CLEANED)).count() == clean["cleaned"]


def test_demo_ui_holds_the_degraded_and_non_face_crops(spark, demo_lake) -> None:
    """The demo records what each crop is: the UI must be the degraded and non-face crops, and the
    clean astronaut crops (one identity, full resolution) must score recognizable."""
    from ers_spark.demo import demo_records

    cfg, records = demo_lake
    kinds = demo_records().set_index("path")["kind"]
    crops = spark.read.format("delta").load(table_path(cfg, CROPS)).select("image_id", "source_path").toPandas()
    kind_of = crops.set_index("image_id")["source_path"].map(lambda p: kinds[p.removeprefix("file:")])
    members = spark.read.format("delta").load(table_path(cfg, UI_MEMBERS)).select("image_id").toPandas().image_id
    member_kinds = kind_of.loc[members].value_counts()
    unrecognizable_kinds = member_kinds.get("degraded", 0) + member_kinds.get("non_face", 0)
    assert unrecognizable_kinds / len(members) >= 0.8, member_kinds.to_dict()
    scores = spark.read.format("delta").load(table_path(cfg, SCORES)).select("image_id", "recognizable").toPandas()
    astronaut = crops[crops.source_path.str.contains("demo/astronaut/")].image_id
    assert scores.set_index("image_id").loc[astronaut, "recognizable"].all()


def test_rerun_changes_no_row(spark, demo_lake) -> None:
    cfg, _ = demo_lake
    watched = (CROPS, EMBEDDINGS, SCORES, CLEANED)
    before = {c.name: table_version(spark, cfg, c) for c in watched}
    records = run_pipeline(cfg)
    after = {c.name: table_version(spark, cfg, c) for c in watched}
    assert after == before
    by_stage = {r["stage"]: r["counts"] for r in records}
    assert by_stage["ingest"]["written"] == 0
    assert by_stage["embed"]["to_embed"] == 0
    assert by_stage["score"]["inserted"] == 0 and by_stage["score"]["rescored"] == 0


@pytest.mark.parametrize("query", pipeline_queries())
def test_readme_sql_runs_on_demo_tables(demo_lake, query) -> None:
    """README's queries over the pipeline's tables (those over evaluate's: tests/test_evaluate.py)."""
    cfg, _ = demo_lake
    query = query.replace("ers.", f"{cfg.storage.database}.")
    out = run_sql(cfg, query)
    assert out != "(no rows)", query


def test_sql_prints_a_table(demo_lake) -> None:
    cfg, _ = demo_lake
    out = run_sql(cfg, f"SELECT count(*) AS n FROM {cfg.storage.database}.crops")
    lines = out.splitlines()
    assert lines[0].strip() == "n" and int(lines[1]) > 200


def test_every_stage_table_is_in_the_catalog(demo_lake) -> None:
    """Users query the tables by name: each table the pipeline wrote is registered in the catalog database."""
    cfg, _ = demo_lake
    listed = run_sql(cfg, f"SHOW TABLES IN {cfg.storage.database}")
    for table in ("crops", "embeddings", "ui_centroids", "ui_members", "scores", "cleaned", "quarantine", "runs"):
        assert table in listed, (table, listed)


def test_demo_summary_says_crops_unrecognizable_uic_gamma_and_where(spark, demo_lake) -> None:
    from ers_spark.demo import demo_summary

    cfg, records = demo_lake
    score = next(r for r in records if r["stage"] == "score")
    text = demo_summary(spark, cfg, records)
    crops = spark.read.format("delta").load(table_path(cfg, CROPS)).count()
    unrecognizable = score["counts"].get("unrecognizable")
    assert f"crops:            {crops}" in text
    assert f"UIC:              {score['params']['uic_id']} (" in text and "members)" in text
    assert f"gamma:            {score['params']['gamma']:.4f}" in text
    if unrecognizable is not None:
        assert f"unrecognizable:   {unrecognizable} (" in text
    assert str(cfg.storage.table_path("crops")) in text and "ers-spark sql" in text
