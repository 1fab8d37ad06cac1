"""`ers-spark import-embeddings`: a user's vectors become the embeddings table; locate-ui, score, clean and
evaluate then run on a lake without a crops table (no images)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chispa import assert_df_equality

from ers_spark.config import load_config
from ers_spark.core.linkage import jaccard
from ers_spark.core.synthetic import vmf_embeddings
from ers_spark.errors import ConfigError, ContractError
from ers_spark.lake.contracts import (
    CLEANED, CROPS, EMBEDDINGS, IMPORTED_SOURCES, QUARANTINE, RUNS, SCORES, UI_MEMBERS,
)
from ers_spark.lake.tables import table_exists, table_path, table_version
from ers_spark.stages.clean import run_clean
from ers_spark.stages.evaluate import run_evaluate
from ers_spark.stages.import_embeddings import run_import_embeddings
from ers_spark.stages.locate_ui import run_locate_ui
from ers_spark.stages.score import run_score

pytestmark = pytest.mark.spark

N_IDS, PER_ID, DIM = 30, 8, 64
MODEL = ("reid_toy", "2026.1")
IMPORT = ("import_embeddings.id_column=item", "import_embeddings.vector_column=vec",
          "import_embeddings.identity_column=person", "import_embeddings.path_column=uri",
          f"import_embeddings.model_name={MODEL[0]}", f"import_embeddings.model_version={MODEL[1]}")
STAGES = ("locate_ui.eps=0.4", "locate_ui.dominance_ratio=3", "locate_ui.kmeans_cells=4", "locate_ui.nprobe=2", "locate_ui.block_size=512",
          "evaluate.impostor_pairs=20000", "evaluate.template_size=4", "evaluate.nonmated_identity_share=0.5")
# the bad rows appended to the good ones, with the reason each must get
BAD = {"null-id": "null_id", "no-vector": "empty_vector", "empty": "empty_vector", "short": "wrong_dimension",
       "nan": "non_finite", "zeros": "zero_vector", "twice": "duplicate_id"}


@pytest.fixture(scope="module")
def vectors() -> dict:
    """30 identities x 8 vMF vectors plus a 10% UI, scaled to norms in [5, 30]; UI rows carry a person label too."""
    emb, labels = vmf_embeddings(N_IDS, PER_ID, dim=DIM, ui_share=0.1, seed=7)
    norms = np.random.default_rng(7).uniform(5, 30, len(emb))
    ids = [f"v{i:04d}" for i in range(len(emb))]
    people = [f"p{y}" if y >= 0 else f"p{i % N_IDS}" for i, y in enumerate(labels)]
    return {"raw": emb.astype(np.float64) * norms[:, None], "unit": emb, "norms": norms, "ids": ids,
            "people": people, "ui": {i for i, y in zip(ids, labels) if y < 0}}


def _rows(vectors: dict) -> list[tuple]:
    """(item, vec, person, uri) rows: every good vector, one exact repeat, and one row per bad case."""
    good = [(i, list(v), p, f"s3://bucket/faces/{i}.jpg") for i, v, p in
            zip(vectors["ids"], vectors["raw"], vectors["people"])]
    v = list(vectors["raw"][0])
    bad = [(None, v, "p0", "s3://bucket/faces/null-id.jpg"), ("no-vector", None, "p0", "s3://bucket/faces/nv.jpg"),
           ("empty", [], "p0", "s3://bucket/faces/empty.jpg"), ("short", v[:16], "p0", "s3://bucket/faces/short.jpg"),
           ("nan", [float("nan")] + v[1:], "p0", "s3://bucket/faces/nan.jpg"),
           ("zeros", [0.0] * DIM, "p0", "s3://bucket/faces/zeros.jpg"),
           ("twice", v, "p1", "s3://bucket/faces/twice-a.jpg"), ("twice", list(vectors["raw"][1]), "p1",
                                                                  "s3://bucket/faces/twice-b.jpg")]
    return good + [good[0]] + bad


def write_parquet(rows: list[tuple], path: Path) -> Path:
    table = pa.table({"item": [r[0] for r in rows], "vec": pa.array([r[1] for r in rows], pa.list_(pa.float64())),
                      "person": [r[2] for r in rows], "uri": [r[3] for r in rows]})
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def imported(spark, tmp_path_factory, vectors):
    """One lake: the vectors imported, then locate-ui, score, clean and evaluate on it (no crops table)."""
    folder = tmp_path_factory.mktemp("byo")
    source = write_parquet(_rows(vectors), folder / "vectors.parquet")
    cfg = load_config(overrides=[f"storage.root={folder / 'lake'}", "storage.database=ers_byo_test",
                                 "spark.shuffle_partitions=2", f"spark.checkpoint_dir={folder / 'ckpt'}",
                                 f"import_embeddings.input_path={source}", *IMPORT, *STAGES])
    records = {"import": run_import_embeddings(spark, cfg)}
    for name, stage in (("locate-ui", run_locate_ui), ("score", run_score), ("clean", run_clean),
                        ("evaluate", run_evaluate)):
        records[name] = stage(spark, cfg)
    return cfg, records


def _table(spark, cfg, contract):
    return spark.read.format("delta").load(table_path(cfg, contract))


def test_import_counts_add_up_and_every_bad_row_is_quarantined_with_its_reason(spark, imported, vectors) -> None:
    cfg, records = imported
    n = len(vectors["ids"])
    assert records["import"]["counts"] == {
        "read": n + 1 + 8, "written": n, "already_present": 0, "duplicate_rows": 1, "quarantined": 8,
        "labels_written": n, "null_id": 1, "empty_vector": 2, "wrong_dimension": 1, "non_finite": 1,
        "zero_vector": 1, "duplicate_id": 2, "changed_vector": 0,
    }
    rows = _table(spark, cfg, QUARANTINE).where("stage = 'import-embeddings'").collect()
    by_path = {r.source_path.rsplit("/", 1)[1]: (r.image_id, r.reason, r.detail, r.model_version) for r in rows}
    assert len(rows) == 8
    null_id = by_path.pop("null-id.jpg")
    assert null_id[0].startswith("null-id:") and null_id[1:] == ("null_id", "the id column is null", MODEL[1])
    assert {name: reason for name, (_, reason, _, _) in by_path.items()} == {
        "nv.jpg": "empty_vector", "empty.jpg": "empty_vector", "short.jpg": "wrong_dimension", "nan.jpg": "non_finite",
        "zeros.jpg": "zero_vector", "twice-a.jpg": "duplicate_id", "twice-b.jpg": "duplicate_id"}
    assert by_path["short.jpg"][2] == "16-D vector, expected 64-D"
    assert by_path["twice-a.jpg"][2] == "id on 2 rows that differ in vector, identity or path"
    assert records["import"]["params"]["dimension"] == DIM
    logged = _table(spark, cfg, RUNS).where("stage = 'import-embeddings'").collect()
    assert [dict(r.counts) for r in logged] == [records["import"]["counts"]]


def test_embeddings_are_the_unit_vectors_with_the_input_norm(spark, imported, vectors) -> None:
    cfg, _ = imported
    pdf = _table(spark, cfg, EMBEDDINGS).toPandas().set_index("image_id").loc[vectors["ids"]]
    np.testing.assert_allclose(np.stack(pdf.embedding.to_numpy()), vectors["unit"], atol=1e-6)
    np.testing.assert_allclose(pdf.raw_norm.to_numpy(), vectors["norms"], rtol=1e-6)
    assert set(zip(pdf.model_name, pdf.model_version)) == {MODEL} and pdf.aligned.isna().all()
    assert len(pdf) == _table(spark, cfg, EMBEDDINGS).count()  # no bad row among them
    sources = _table(spark, cfg, IMPORTED_SOURCES).toPandas().set_index("image_id").loc[vectors["ids"]]
    assert list(sources.identity) == vectors["people"]
    assert list(sources.source_path) == [f"s3://bucket/faces/{i}.jpg" for i in vectors["ids"]]
    assert not table_exists(spark, cfg, CROPS)


def test_locate_score_clean_and_evaluate_run_without_images(spark, imported, vectors) -> None:
    cfg, records = imported
    members = {r.image_id for r in _table(spark, cfg, UI_MEMBERS).collect()}
    assert jaccard(members, vectors["ui"]) >= 0.9
    score = records["score"]
    assert score["params"]["gamma_method"] == "pairs-frr-at-far"  # calibrated on the imported identities
    assert score["counts"]["scored"] == len(vectors["ids"])
    clean = records["clean"]["counts"]
    assert clean["scored"] == clean["cleaned"] + clean["quarantined"] == len(vectors["ids"])
    assert records["clean"]["input_versions"]["crops"] is None
    cleaned = _table(spark, cfg, CLEANED).select("image_id", "source_path", "identity")
    expected = _table(spark, cfg, IMPORTED_SOURCES).select("image_id", "source_path", "identity").join(
        cleaned.select("image_id"), "image_id")
    assert_df_equality(cleaned, expected, ignore_row_order=True, ignore_nullable=True)
    unrecognizable = _table(spark, cfg, QUARANTINE).where("stage = 'clean' AND reason = 'unrecognizable'")
    assert unrecognizable.where("source_path IS NULL").count() == 0 and unrecognizable.count() > 0
    assert records["evaluate"]["counts"]["identities"] == N_IDS
    page = Path(cfg.report.output_path(cfg.storage)).read_text()
    assert "no image (imported vector)" in page and "cannot decode" not in page


def test_reimport_is_idempotent_and_a_changed_vector_is_quarantined(spark, make_cfg, vectors, tmp_path) -> None:
    rows = _rows(vectors)
    cfg = make_cfg(f"import_embeddings.input_path={write_parquet(rows, tmp_path / 'a.parquet')}", *IMPORT)
    first = run_import_embeddings(spark, cfg)
    watched = (EMBEDDINGS, IMPORTED_SOURCES, QUARANTINE)
    before = {c.name: _table(spark, cfg, c).drop("embedded_at", "imported_at", "quarantined_at") for c in watched}
    before = {k: spark.createDataFrame(df.collect(), df.schema) for k, df in before.items()}
    again = run_import_embeddings(spark, cfg)
    n = len(vectors["ids"])
    assert again["counts"] == {**first["counts"], "written": 0, "already_present": n, "labels_written": 0}
    for contract in watched:
        now = _table(spark, cfg, contract).drop("embedded_at", "imported_at", "quarantined_at")
        assert_df_equality(now, before[contract.name], ignore_row_order=True, ignore_nullable=True)

    changed = [(rows[0][0], [x * 2 + 1 for x in rows[0][1]], *rows[0][2:]), (rows[1][0], rows[1][1], "p99", rows[1][3])]
    cfg = cfg.with_overrides([f"import_embeddings.input_path={write_parquet(changed, tmp_path / 'b.parquet')}"])
    third = run_import_embeddings(spark, cfg)
    assert (third["counts"]["changed_vector"], third["counts"]["labels_written"], third["counts"]["already_present"]) == (1, 1, 1)
    stored = _table(spark, cfg, EMBEDDINGS).where(f"image_id = '{rows[0][0]}'").first()
    np.testing.assert_allclose(stored.embedding, vectors["unit"][0], atol=1e-6)  # the stored vector stays
    assert _table(spark, cfg, IMPORTED_SOURCES).where(f"image_id = '{rows[1][0]}'").first().identity == "p99"
    assert table_version(spark, cfg, SCORES) is None


def test_ml_vectors_import_like_float_arrays(spark, make_cfg, tmp_path) -> None:
    from pyspark.ml.linalg import Vectors

    raw = np.random.default_rng(1).normal(size=(6, 8))
    rows = [(f"m{i}", Vectors.dense(v.tolist()), [float(x) for x in v.astype(np.float32)]) for i, v in enumerate(raw)]
    df = spark.createDataFrame(rows, ["item", "vec", "floats"]).selectExpr("item", "vec", "CAST(floats AS array<float>) AS floats")
    df.write.format("delta").save(str(tmp_path / "in"))
    base = [f"import_embeddings.input_path={tmp_path / 'in'}", "import_embeddings.input_format=delta",
            "import_embeddings.id_column=item", "import_embeddings.model_name=toy"]
    for version, column in (("ml", "vec"), ("floats", "floats")):
        cfg = make_cfg(*base, f"import_embeddings.vector_column={column}", f"import_embeddings.model_version={version}")
        assert run_import_embeddings(spark, cfg)["counts"]["written"] == 6
    stored = _table(spark, cfg, EMBEDDINGS).toPandas().sort_values("image_id")
    ml, floats = (np.stack(stored[stored.model_version == v].embedding.to_numpy()) for v in ("ml", "floats"))
    np.testing.assert_allclose(ml, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(floats, ml, atol=1e-6)
    assert not table_exists(spark, cfg, IMPORTED_SOURCES)  # no identity or path column: no labels to keep


def test_a_vector_column_of_another_type_is_a_one_line_error(spark, make_cfg, tmp_path) -> None:
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "embedding": pa.array([[1, 2]], pa.list_(pa.int64()))}), path)
    cfg = make_cfg(f"import_embeddings.input_path={path}", "import_embeddings.model_name=m",
                   "import_embeddings.model_version=1")
    with pytest.raises(ContractError) as err:
        run_import_embeddings(spark, cfg)
    assert str(err.value) == (
        f"parquet input {path} (set import_embeddings.*_column): column 'embedding' is array<bigint>, "
        "expected array<float>, array<double> or an ML vector"
    )


def test_model_name_is_required(tmp_path) -> None:
    """No default model name: the import stops in one line before Spark starts."""
    cfg = load_config(overrides=[f"import_embeddings.input_path={tmp_path}", "import_embeddings.model_version=1"])
    with pytest.raises(ConfigError) as err:
        cfg.import_embeddings.require(cfg.source)
    message = ("import_embeddings.model_name is required for import-embeddings (in "
               f"{cfg.source}); pass import_embeddings.model_name=...")
    assert str(err.value) == message
    proc = subprocess.run([sys.executable, "-m", "ers_spark.cli", "import-embeddings",
                           f"import_embeddings.input_path={tmp_path}", "import_embeddings.model_version=1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]
