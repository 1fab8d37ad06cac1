"""The evaluate stage on a tiny labelled lake: pair building on Spark, the four protocols, the pairs file, the tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from ers_spark.config import load_config
from ers_spark.core import ers as ers_math
from ers_spark.core import metrics
from ers_spark.core.synthetic import vmf_embeddings
from ers_spark.errors import ConfigError, ContractError
from ers_spark.lake.contracts import EVAL_CURVES, EVAL_METRICS, EVAL_RUNS, EVAL_TABLES, IDENTITY, check_contract, same_type
from ers_spark.lake.tables import table_path
from ers_spark.core.calibration import calibration_identities
from ers_spark.distributed.calibration import calibration_identity, identity_roles
from ers_spark.distributed.pairs import ITEM, genuine_pairs, impostor_pairs
from ers_spark.stages.evaluate import load_images, run_evaluate
from ers_spark.stages.score import run_score
from ers_spark.sql import run_sql
from readme_queries import evaluate_queries
from stage_data import write_embeddings, write_uic

pytestmark = pytest.mark.spark

N_IDS, PER_ID, N_DEGRADED = 8, 10, 2  # clean images per identity; the first N_DEGRADED also have a degraded copy
N_LABELLED = N_IDS * (PER_ID + N_DEGRADED)


@pytest.fixture(scope="module")
def dataset():
    """8 identities x (10 clean + 2 copies pulled close to the UI direction) + 14 unlabelled UI images.

    The degraded copies of different people look alike (all near the UI), so they set the baseline's
    threshold; rejecting them as unsure lets the threshold drop (the paper's mechanism). kappa=200 puts
    the clean genuine pairs (median cosine ~0.8) below the degraded impostor pairs (~0.9), so the
    mechanism holds whichever half of the identities calibrates (checked on 30 splits in numpy).
    """
    rng = np.random.default_rng(3)
    emb, labels = vmf_embeddings(n_identities=N_IDS, per_identity=PER_ID, dim=32, kappa=200.0, ui_share=0.15, seed=5)
    ui_rows = labels < 0
    uic = ers_math.ui_centroid(emb[ui_rows])
    clean, clean_labels = emb[~ui_rows], labels[~ui_rows]
    copied = np.concatenate([np.flatnonzero(clean_labels == k)[:N_DEGRADED] for k in range(N_IDS)])
    mix = rng.uniform(0.9, 0.99, (copied.size, 1))
    degraded = ers_math.normalize_rows(
        np.sqrt(1 - mix**2) * clean[copied] + mix * uic + 0.05 * rng.normal(size=(copied.size, clean.shape[1])))
    ids = [f"c{i:03d}" for i in range(len(clean))] + [f"d{i:03d}" for i in copied] + \
          [f"u{i:03d}" for i in range(int(ui_rows.sum()))]
    identities = [f"p{y}" for y in np.r_[clean_labels, clean_labels[copied]]] + [None] * int(ui_rows.sum())
    return {"ids": ids, "emb": np.vstack([clean, degraded, emb[ui_rows]]), "identities": identities, "uic": uic,
            "ui_members": [i for i in ids if i.startswith("u")], "copied": copied}


EVAL_OVERRIDES = ("score.gamma=0.5", "evaluate.impostor_pairs=100000", "evaluate.template_size=4",
                  "evaluate.nonmated_identity_share=0.5")


@pytest.fixture(scope="module")
def evaluated(spark, tmp_path_factory, dataset):
    """The lake scored once and evaluated once (module-scoped: the stage's tests read the same run)."""
    folder = tmp_path_factory.mktemp("evaluate")
    cfg = load_config(overrides=[f"storage.root={folder / 'lake'}", "storage.database=ers_eval_test",
                                 "spark.shuffle_partitions=2", f"spark.checkpoint_dir={folder / 'ckpt'}",
                                 *EVAL_OVERRIDES])
    write_embeddings(spark, cfg, dataset["ids"], dataset["emb"], dataset["identities"])
    write_uic(spark, cfg, dataset["uic"], dataset["ui_members"])
    run_score(spark, cfg)
    record = run_evaluate(spark, cfg)
    tables = {name: spark.read.format("delta").load(table_path(cfg, c)).toPandas() for name, c in EVAL_TABLES.items()}
    return cfg, record, tables


def _metric(tables, protocol, method, metric, point) -> pd.Series:
    m = tables["eval_metrics"]
    rows = m[(m.protocol == protocol) & (m.method == method) & (m.metric == metric) & (m.operating_point == point)]
    assert len(rows) == 1, f"{protocol}/{method}/{metric}/{point}: {len(rows)} rows"
    return rows.iloc[0]


def test_tables_follow_their_contracts(spark, evaluated) -> None:
    cfg, record, _ = evaluated
    for contract in (EVAL_RUNS, EVAL_METRICS, EVAL_CURVES):
        df = spark.read.format("delta").load(table_path(cfg, contract))
        check_contract(df, contract)
        assert [f.name for f in df.schema.fields] == contract.columns
        assert all(same_type(a.dataType, e.dataType) for a, e in zip(df.schema.fields, contract.schema.fields))
    assert record["output_versions"]["eval_metrics"] is not None


def test_readme_has_a_query_over_evaluate_tables() -> None:
    assert evaluate_queries(), "README lost its eval_metrics example"


@pytest.mark.parametrize("query", evaluate_queries())
def test_readme_sql_runs_on_evaluate_tables(evaluated, query) -> None:
    """README's queries over evaluate's tables, on this module's evaluated lake: the eval_metrics one prints
    every row of the latest run's headline metrics (baseline and ERS methods side by side)."""
    cfg, record, tables = evaluated
    out = run_sql(cfg, query.replace("ers.", f"{cfg.storage.database}."), limit=500)
    assert out != "(no rows)", query
    header, *rows = out.splitlines()
    assert rows and header.split()[:3] == ["protocol", "method", "metric"], out
    metrics = tables["eval_metrics"]
    shown = metrics[metrics.metric.isin(["frr", "fnir", "tar", "pauc", "unsure_rate_genuine"])]
    assert len(rows) == len(shown) and {row.split()[1] for row in rows} == set(shown.method), out
    assert {"baseline", "ers_rejection", "unsure_as_reject"} <= set(shown.method)


def test_one_run_row_with_gamma_and_inputs(evaluated) -> None:
    _, record, tables = evaluated
    runs = tables["eval_runs"]
    assert len(runs) == 1 and runs.run_id[0] == record["run_id"]
    assert runs.pairs_source[0] == "identities" and runs.model[0] == "synthetic 1"
    assert 0 <= runs.gamma[0] <= 1 and runs.gamma[0] == record["params"]["gamma"]
    assert set(json.loads(runs.input_versions[0])) == {"embeddings", "scores", "crops", "imported_sources", "ui_centroids"}
    assert json.loads(runs.params[0])["template_size"] == 4
    assert set(tables["eval_metrics"].run_id) == set(tables["eval_curves"].run_id) == {record["run_id"]}


def test_evaluate_ends_by_writing_the_report_of_its_run(evaluated) -> None:
    cfg, record, _ = evaluated
    path = cfg.report.output_path(cfg.storage)
    assert record["params"]["report"] == path
    html = Path(path).read_text()
    assert f"<code>{record['run_id']}</code>" in html and "no-evaluation" not in html
    for section in ("metrics-verification", "metrics-identification", "metrics-set"):
        assert f'id="{section}"' in html


def test_a_report_path_it_cannot_write_fails_before_any_work(spark, tmp_path) -> None:
    """A report URI no Hadoop FileSystem serves: the one-line config error comes before any table is read
    (the lake here is empty, so reading a table first would fail with another message)."""
    cfg = load_config(overrides=[f"storage.root={tmp_path / 'lake'}", "storage.database=ers_eval_remote",
                                 "report.path=nosuchfs://bucket/report.html"])
    with pytest.raises(ConfigError, match=r"^report.path=nosuchfs://bucket/report.html cannot be written: .*nosuchfs"):
        run_evaluate(spark, cfg)


def test_every_protocol_writes_its_rows(evaluated) -> None:
    _, record, tables = evaluated
    m = tables["eval_metrics"]
    assert set(m.protocol) == {"verification", "identification", "set", "edc"}
    assert set(m[m.protocol == "set"].method) == set(metrics.POOLING_METHODS)
    assert {"baseline", "unsure_as_reject", "sure_only", "unsure", "calibration"} <= set(m[m.protocol == "verification"].method)
    assert set(m[m.protocol == "identification"].method) == {"baseline", "ers_rejection"}
    assert set(m[(m.protocol == "edc") & (m.metric == "pauc")].method) == {"ers", "norm", "random"}
    curves = tables["eval_curves"]
    assert {("det", "baseline"), ("det", "unsure_as_reject"), ("edc", "ers"), ("edc", "random")} <= set(
        zip(curves.curve, curves.method))
    edc = curves[(curves.curve == "edc") & (curves.method == "ers")].sort_values("point_index")
    assert edc.x.iloc[0] == 0 and edc.x.iloc[-1] == pytest.approx(0.5) and len(edc) == 51
    # every identity has 12 labelled images: all its 66 genuine pairs, and every impostor pair
    per_identity = PER_ID + N_DEGRADED
    assert record["counts"]["genuine_pairs"] == N_IDS * per_identity * (per_identity - 1) // 2
    assert record["counts"]["impostor_pairs"] == (N_LABELLED**2 - N_IDS * per_identity**2) // 2


def test_far_operating_points_stop_where_impostors_run_out(evaluated) -> None:
    _, _, tables = evaluated
    m = tables["eval_metrics"]
    base = m[(m.protocol == "verification") & (m.method == "baseline") & (m.metric == "tar")]
    n_imp = int(m[(m.protocol == "verification") & (m.method == "baseline") & (m.metric == "far")]["count"].iloc[0])
    expected, unsupported = metrics.supported_rates(n_imp, [0.1, 0.01, 0.001, 0.0001])
    assert set(base.operating_point) == {metrics.operating_point_label("far", f) for f in expected}
    assert unsupported  # 4 evaluation identities give ~860 impostor pairs: not enough for 1e-3


def test_baseline_verification_matches_numpy_on_the_evaluation_identities(spark, evaluated, dataset) -> None:
    """With no cap binding, the stage's pairs are all pairs: recompute TAR@FAR=1e-1 by brute force."""
    cfg, _, tables = evaluated
    images, _ = load_images(spark, cfg)
    roles = identity_roles(images, cfg.evaluate).toPandas().set_index(IDENTITY)
    ids = np.array(dataset["identities"][:N_LABELLED])
    emb = dataset["emb"][: ids.size].astype(np.float64)
    ev = ~roles.loc[ids, "calibration"].to_numpy(bool)
    i, j = np.triu_indices(ids.size, 1)
    keep = ev[i] & ev[j]
    i, j = i[keep], j[keep]
    sim = np.einsum("ij,ij->i", emb[i], emb[j])
    same = ids[i] == ids[j]
    point = metrics.verification_at_far(sim[same], sim[~same], 0.1)
    row = _metric(tables, "verification", "baseline", "tar", "far=1e-1")
    assert row.value == pytest.approx(point.accept_rate, abs=1e-6) and row["count"] == same.sum()


def test_ers_helps_on_degraded_copies(evaluated) -> None:
    """The degraded copies sit near the UI: unsure-as-reject lowers FRR, ERS beats random on the EDC."""
    _, _, tables = evaluated
    baseline = _metric(tables, "verification", "baseline", "frr", "far=1e-2").value
    unsure = _metric(tables, "verification", "unsure_as_reject", "frr", "far=1e-2").value
    assert unsure < baseline
    assert _metric(tables, "edc", "ers", "pauc", "discard<=0.5").value < _metric(tables, "edc", "random", "pauc", "discard<=0.5").value
    assert _metric(tables, "verification", "unsure", "unsure_rate_genuine", "gamma").value > 0


def _items(spark, sizes: dict[str, int]):
    rows = [(f"{p}_{k}", p) for p, n in sizes.items() for k in range(n)]
    return spark.createDataFrame(rows, f"{ITEM} string, {IDENTITY} string")


@pytest.mark.parametrize("per_identity", [3, 50])
def test_genuine_pairs_are_within_identities_capped_and_seeded(spark, per_identity: int) -> None:
    items = _items(spark, {"a": 12, "b": 4, "c": 1})
    got = genuine_pairs(items, per_identity=per_identity, max_total=1000, seed=7).toPandas()
    assert (got.a.str[0] == got.b.str[0]).all() and (got.a < got.b).all()
    assert not got.duplicated().any()
    per = got.a.str[0].value_counts().to_dict()
    assert per == {"a": min(66, per_identity), "b": min(6, per_identity)}
    again = genuine_pairs(items, per_identity=per_identity, max_total=1000, seed=7).toPandas()
    pd.testing.assert_frame_equal(got.sort_values(["a", "b"]).reset_index(drop=True),
                                  again.sort_values(["a", "b"]).reset_index(drop=True))
    assert len(genuine_pairs(items, per_identity=per_identity, max_total=2, seed=7).toPandas()) == 2


@pytest.mark.parametrize("count", [40, 5000])
def test_impostor_pairs_cross_identities_without_a_cross_join(spark, count: int) -> None:
    items = _items(spark, {f"p{i}": 10 for i in range(30)})  # 43,500 impostor pairs in all
    got = impostor_pairs(items, count=count, seed=1).toPandas()
    assert len(got) == count
    assert (got.a.str.split("_").str[0] != got.b.str.split("_").str[0]).all()
    assert not got.duplicated().any() and (got.a < got.b).all()
    assert got.equals(impostor_pairs(items, count=count, seed=1).toPandas())
    assert not got.equals(impostor_pairs(items, count=count, seed=2).toPandas())


def test_small_population_gives_every_impostor_pair(spark) -> None:
    got = impostor_pairs(_items(spark, {"a": 3, "b": 2}), count=100, seed=0).toPandas()
    assert len(got) == 6


def test_pairs_file_by_path_and_id(spark, evaluated, dataset, tmp_path) -> None:
    """A user's CSV naming images by image_id or by source path; a pair naming an unknown image is counted, not used."""
    cfg, _, _ = evaluated
    rng = np.random.default_rng(0)
    ids = dataset["ids"][:N_LABELLED]
    labels = dataset["identities"][:N_LABELLED]
    rows = []
    while len(rows) < 300:
        a, b = sorted(rng.choice(N_LABELLED, 2, replace=False))
        same = labels[a] == labels[b]
        if same or sum(not r[2] for r in rows) < 200:
            rows.append((ids[a], ids[b], int(same)))
    rows = [(f"/data/{labels[ids.index(a)]}/{a}.png" if k % 3 == 0 else a, b, y) for k, (a, b, y) in enumerate(rows)]
    rows.append(("no_such_image", "c001", 1))
    path = tmp_path / "pairs.csv"
    pd.DataFrame(rows, columns=["left", "right", "label"]).to_csv(path, index=False)
    record = run_evaluate(spark, cfg.with_overrides([f"evaluate.pairs_path={path}"]))
    assert record["counts"]["pairs_unresolved"] == 1
    n_same = sum(r[2] for r in rows[:-1])
    assert record["counts"]["genuine_pairs"] == n_same and record["counts"]["impostor_pairs"] == 300 - n_same
    runs = spark.read.format("delta").load(table_path(cfg, EVAL_RUNS)).toPandas()
    assert runs.set_index("run_id").loc[record["run_id"], "pairs_source"] == f"file:{path}"
    m = spark.read.format("delta").load(table_path(cfg, EVAL_METRICS)).where(f"run_id = '{record['run_id']}'").toPandas()
    assert {"verification", "edc"} <= set(m.protocol)


def test_pairs_file_with_a_bad_label_is_a_contract_error(spark, evaluated, tmp_path) -> None:
    cfg, _, _ = evaluated
    path = tmp_path / "pairs.parquet"
    pd.DataFrame({"left": ["c000"], "right": ["c001"], "label": ["maybe"]}).to_parquet(path)
    with pytest.raises(ContractError, match="label other than"):
        run_evaluate(spark, cfg.with_overrides([f"evaluate.pairs_path={path}"]))
    pd.DataFrame({"a": ["c000"], "b": ["c001"]}).to_parquet(path)
    with pytest.raises(ContractError, match="lacks column"):
        run_evaluate(spark, cfg.with_overrides([f"evaluate.pairs_path={path}"]))


@pytest.mark.parametrize("share", [0.3, 0.5])
def test_evaluate_and_score_split_identities_alike(spark, share: float) -> None:
    """One split of identities: evaluate's Spark column draws exactly as score's numpy function, name by name."""
    names = [f"person{i}" for i in range(300)] + ["Zoë", "a b", "0"]
    df = spark.createDataFrame([(n,) for n in names], f"{IDENTITY} string")
    drawn = df.select(IDENTITY, calibration_identity(F.col(IDENTITY), share, 7).alias("cal")).toPandas()
    expected = calibration_identities(drawn[IDENTITY].to_numpy(), share, 7)
    assert drawn["cal"].tolist() == expected.tolist()
    assert abs(expected.mean() - share) < 0.1  # about `share` of the identities, not all or none
