"""locate-ui: the distributed graph clustering against exact scipy single linkage, and the stage's I/O."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from ers_spark.lake.contracts import (
    CENTROID,
    EMBEDDED_AT,
    EMBEDDING,
    EMBEDDINGS,
    EPS,
    IMAGE_ID,
    MEMBER_COUNT,
    METHOD,
    MODEL_NAME,
    MODEL_VERSION,
    RAW_NORM,
    TOP_CLUSTER_SIZES,
    UI_CENTROIDS,
    UI_MEMBERS,
    UIC_ID,
)
from ers_spark.errors import ClusteringError, ConfigError, ErsUserError
from ers_spark.core.ers import ui_centroid
from ers_spark.lake.tables import merge_insert_new, read_table, table_version
from ers_spark.distributed.cells import cell_count
from ers_spark.distributed.linkage import connected_components_builtin, connected_components_graphframes
from ers_spark.distributed.ui_cluster import check_dominance
from ers_spark.stages.locate_ui import run_locate_ui
from ers_spark.core.linkage import exact_single_linkage, jaccard, links_to_labels
from ers_spark.core.synthetic import RECOMMENDED_EPS, vmf_embeddings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

FAST = (
    "locate_ui.kmeans_cells=4",
    "locate_ui.nprobe=2",
    "locate_ui.block_size=512",
    "locate_ui.dominance_ratio=5",
)


def write_embeddings(spark, cfg, x: np.ndarray, ids: list[str], model=("synthetic", "1"), at: datetime | None = None):
    """Write unit embeddings as the embeddings Delta table (through the project's MERGE)."""
    import pandas as pd

    at = at or datetime(2024, 1, 1)
    pdf = pd.DataFrame(
        {
            IMAGE_ID: ids,
            EMBEDDING: list(np.asarray(x, np.float32)),
            RAW_NORM: np.ones(len(ids), np.float32),
            MODEL_NAME: model[0],
            MODEL_VERSION: model[1],
            EMBEDDED_AT: at,
            "aligned": None,
        }
    )
    df = spark.createDataFrame(pdf, EMBEDDINGS.schema)
    return merge_insert_new(spark, cfg, EMBEDDINGS, df)


@pytest.fixture(scope="module")
def vmf():
    x, y = vmf_embeddings(n_identities=150, per_identity=10, ui_share=0.1, seed=3)
    ids = [f"img{i:05d}" for i in range(x.shape[0])]
    exact = exact_single_linkage(x, RECOMMENDED_EPS)
    lab, cnt = np.unique(exact, return_counts=True)
    ui_exact = np.flatnonzero(exact == lab[np.argmax(cnt)])
    return x, y, ids, ui_exact


def _stored(spark, cfg, uic_id: str):
    row = read_table(spark, cfg, UI_CENTROIDS).where(F.col(UIC_ID) == uic_id).first()
    members = [
        r[IMAGE_ID] for r in read_table(spark, cfg, UI_MEMBERS).where(F.col(UIC_ID) == uic_id).collect()
    ]
    return row, members


# ----------------------------------------------------------------------------- pure parts


def test_params_from_config(make_cfg):
    p = make_cfg("locate_ui.eps_grid_start=0.1", "locate_ui.eps_grid_stop=0.3", "locate_ui.eps_grid_step=0.05").locate_ui
    assert p.eps_grid == (0.1, 0.15, 0.2, 0.25, 0.3)
    assert p.method == "graph" and p.connected_components == "builtin"


@pytest.mark.parametrize(
    ("n_rows", "overrides", "cells"),
    [
        (1_000_000, (), 489),  # an average cell fills half of max_cell_rows
        (10_000_000, (), 4096),  # the 1e7 benchmark: bounded by max_top_cells ...
        (1_000_000_000, (), 4096),  # ... and so is 1e9: more sub-cells, the same cells
        (1_000, ("locate_ui.max_cell_rows=4",), 1000),
        (1_000, ("locate_ui.kmeans_sample_rows=160", "locate_ui.kmeans_cells=10"), 10),  # the configured count
    ],
)
def test_cell_count_is_bounded_whatever_the_rows(make_cfg, n_rows, overrides, cells):
    params = make_cfg("locate_ui.nprobe=2", "locate_ui.max_cell_rows=8192", *overrides).locate_ui
    assert cell_count(n_rows, params) == cells


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("locate_ui.kmeans_sample_rows=159", "locate_ui.kmeans_cells=10"),
            "locate_ui.kmeans_sample_rows (159) must be at least 16 x locate_ui.kmeans_cells (10): k-means needs "
            "that many sampled rows per coarse cell (in {src})",
        ),
        (
            ("locate_ui.kmeans_sample_rows=50000",),
            "locate_ui.kmeans_sample_rows (50000) must be at least 16 x locate_ui.max_top_cells (4096): k-means needs "
            "that many sampled rows per coarse cell (in {src})",
        ),
    ],
)
def test_config_refuses_a_sample_too_small_for_the_cells(make_cfg, overrides, message):
    from ers_spark.config import embedded_config_path

    with pytest.raises(ConfigError) as err:
        make_cfg(*overrides)
    assert str(err.value) == message.format(src=embedded_config_path())


def test_check_dominance():
    check_dominance([50, 5, 1], 100, ratio=5, min_share=0.1)
    check_dominance([3], 3, ratio=5, min_share=0.1)  # one cluster, >= 2 members
    with pytest.raises(ClusteringError, match=r"top sizes \[50, 20, 1\] of 100 rows"):
        check_dominance([50, 20, 1], 100, ratio=5, min_share=0.1)
    with pytest.raises(ClusteringError):
        check_dominance([1, 1], 2, ratio=5, min_share=0.0)


TINY_GRAPHS = {
    "chain": [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6)],
    "reverse_chain": [(6, 5), (5, 4), (4, 3), (3, 2), (2, 1)],
    "star": [(10, 1), (10, 2), (10, 3), (10, 4)],
    "two_components": [(1, 2), (2, 3), (7, 8), (9, 8)],
    "cycle_and_dupes": [(3, 1), (1, 2), (2, 3), (3, 1)],
    "isolated_self_loop": [(5, 5)],
}


def _tiny_union() -> tuple[list[tuple[int, int]], dict[int, int]]:
    """All tiny graphs as one disjoint union (ids offset by 100 per graph) and the expected roots.

    One Spark run covers every shape (local Spark pays seconds per round, not per edge).
    """
    edges: list[tuple[int, int]] = []
    expected: dict[int, int] = {}
    for g, name in enumerate(sorted(TINY_GRAPHS)):
        part = [(a + 100 * g, b + 100 * g) for a, b in TINY_GRAPHS[name]]
        edges += part
        real = [(a, b) for a, b in part if a != b]
        nodes = sorted({v for e in real for v in e})
        if nodes:
            lab = links_to_labels(nodes, [a for a, _ in real], [b for _, b in real])
            expected.update(zip(nodes, lab.tolist()))
    return edges, expected


@pytest.mark.parametrize("impl", ["builtin-star-rounds", "builtin-one-task", "graphframes"])
def test_connected_components_tiny_graphs(spark, impl):
    edges, expected = _tiny_union()
    links = spark.createDataFrame(edges, "src long, dst long")
    if impl == "builtin-star-rounds":
        comps, rounds = connected_components_builtin(links, one_task_max_links=0)
        assert rounds >= 1
    elif impl == "builtin-one-task":
        comps, rounds = connected_components_builtin(links, one_task_max_links=1000)
        assert rounds == 0
    else:
        try:
            comps = connected_components_graphframes(spark, links)
        except ErsUserError as exc:  # GraphFrames is not installed (set ERS_TEST_EXTRA_JARS to run it)
            msg = str(exc)
            assert "\n" not in msg and "GraphFrames" in msg and "connected_components=builtin" in msg
            pytest.skip("GraphFrames is not installed (its one-line error was checked); set ERS_TEST_EXTRA_JARS to run it")
    got = {r["node"]: r["root"] for r in comps.collect()}
    assert got == expected
    # sorted names: chain=0, cycle_and_dupes=1, isolated_self_loop=2 (no node), reverse_chain=3, star=4, two=5
    assert expected[2] == 1 and expected[306] == 301 and expected[410] == 401
    assert expected[503] == 501 and expected[509] == 507 and 205 not in got


def test_connected_components_checkpoint_into_the_checkpoint_dir(spark):
    """A long chain needs several rounds; the checkpoints are files in spark.checkpoint_dir (they survive a
    lost executor), not blocks in executor memory, and the components are still right."""
    n = 200
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    links = spark.createDataFrame([(int(order[i]), int(order[i + 1])) for i in range(n - 1)], "src long, dst long")
    folder = Path(spark.sparkContext.getCheckpointDir().removeprefix("file:"))
    before = set(folder.rglob("rdd-*"))
    comps, rounds = connected_components_builtin(links, checkpoint_every=1, one_task_max_links=0)
    assert rounds >= 2
    assert {r["root"] for r in comps.collect()} == {0} and comps.count() == n
    assert set(folder.rglob("rdd-*")) - before  # written by this run
    assert spark.conf.get("spark.cleaner.referenceTracking.cleanCheckpoints") == "true"


# ----------------------------------------------------------------------------- stage on synthetic data


@pytest.fixture(scope="module")
def graph_run(spark, vmf, tmp_path_factory):
    """One graph-method run on the vMF data, shared by the tests that inspect it (Spark is slow)."""
    from ers_spark.config import load_config

    x, _, ids, _ = vmf
    root = tmp_path_factory.mktemp("graph_run")
    cfg = load_config(
        overrides=[f"storage.root={root / 'lake'}", f"storage.database=ers_graph_run_{os.getpid()}",
                   *FAST, f"locate_ui.eps={RECOMMENDED_EPS}"]
    )
    write_embeddings(spark, cfg, x, ids)
    return cfg, run_locate_ui(spark, cfg)


@pytest.mark.parametrize("cells", [("locate_ui.kmeans_cells=4",),
                                   ("locate_ui.kmeans_cells=null", "locate_ui.max_top_cells=25",
                                    "locate_ui.kmeans_sample_rows=400")])
def test_graph_with_a_cut_ui_cell_matches_exact_single_linkage(spark, make_cfg, cells):
    """The UI's oversized cell is cut into sub-cells (capped work per group); the members stay exact.

    kmeans_cells=4: the coarse quantiser puts the whole UI in one cell, trained, counted and cut on a driver
    sample that holds every row; null: cells sized from the rows, and a driver sample smaller than the table,
    so the cells' sizes are counted and their sub-centres trained on the executors' larger sample.
    """
    x, y = vmf_embeddings(n_identities=150, per_identity=10, ui_share=0.2, seed=5)
    ids = [f"cut{i:05d}" for i in range(x.shape[0])]
    exact = exact_single_linkage(x, 0.3)
    exact_ids = [ids[i] for i in np.flatnonzero(exact == np.bincount(exact).argmax())]
    cfg = make_cfg(*cells, "locate_ui.nprobe=2", "locate_ui.max_cell_rows=300",
                   "locate_ui.eps=0.3", "locate_ui.dominance_ratio=5", "locate_ui.block_size=256")
    write_embeddings(spark, cfg, x, ids)
    rec = run_locate_ui(spark, cfg)
    row, members = _stored(spark, cfg, rec["params"]["uic_id"])
    assert rec["counts"]["cut_cells"] >= 1 and rec["counts"]["groups"] > rec["counts"]["cells"]
    assert jaccard(members, exact_ids) >= 0.99
    assert float(np.dot(np.asarray(row[CENTROID]), ui_centroid(x[np.isin(ids, exact_ids)]))) >= 0.9999
    n = x.shape[0]
    assert rec["counts"]["pair_comparisons"] < n * (n - 1) // 2 // 2  # far below all pairs


def test_graph_matches_exact_single_linkage(spark, vmf, graph_run):
    x, _, ids, ui_exact = vmf
    cfg, rec = graph_run
    nprobe = cfg.locate_ui.nprobe
    row, members = _stored(spark, cfg, rec["params"]["uic_id"])
    exact_ids = [ids[i] for i in ui_exact]
    assert jaccard(members, exact_ids) >= 0.95
    ref = ui_centroid(x[ui_exact])
    assert float(np.dot(np.asarray(row[CENTROID]), ref)) >= 0.999
    assert row[MEMBER_COUNT] == len(members) == rec["counts"]["members"]
    assert row[METHOD] == "graph" and row[EPS] == pytest.approx(RECOMMENDED_EPS)
    assert row[TOP_CLUSTER_SIZES][0] == len(members) and len(row[TOP_CLUSTER_SIZES]) == 5
    assert rec["input_versions"]["embeddings"] == table_version(spark, cfg, EMBEDDINGS)
    assert rec["counts"]["links"] <= nprobe * len(ids) and rec["counts"]["raw_edges"] >= rec["counts"]["links"]
    # mean member distance from the executor sums equals the direct computation
    c = np.asarray(row[CENTROID])
    mine = x[[ids.index(m) for m in members]]
    assert row["mean_member_distance"] == pytest.approx(float(np.mean(1 - mine @ c)), abs=1e-4)


def test_graphframes_connected_components_in_the_stage(spark, make_cfg, vmf, graph_run):
    """With GraphFrames the stage finds the builtin run's members; without it, it stops before any work.

    Set ERS_TEST_EXTRA_JARS to a GraphFrames jar (deploy/build_graphframes_jar.sh) and install
    graphframes-py of the same version to run the GraphFrames branch.
    """
    x, _, ids, _ = vmf
    cfg = make_cfg(*FAST, f"locate_ui.eps={RECOMMENDED_EPS}", "locate_ui.connected_components=graphframes")
    write_embeddings(spark, cfg, x, ids)
    versions = table_version(spark, cfg, EMBEDDINGS), table_version(spark, cfg, UI_CENTROIDS)
    try:
        rec = run_locate_ui(spark, cfg)
    except ErsUserError as exc:
        msg = str(exc)
        assert "\n" not in msg and "GraphFrames" in msg and "connected_components=builtin" in msg
        assert (table_version(spark, cfg, EMBEDDINGS), table_version(spark, cfg, UI_CENTROIDS)) == versions
        assert versions[1] is None
        pytest.skip("GraphFrames is not installed (the stage stopped before any work, checked); "
                    "set ERS_TEST_EXTRA_JARS to run it")
    builtin_cfg, builtin_rec = graph_run
    _, members = _stored(spark, cfg, rec["params"]["uic_id"])
    _, builtin_members = _stored(spark, builtin_cfg, builtin_rec["params"]["uic_id"])
    assert sorted(members) == sorted(builtin_members)
    assert rec["params"]["connected_components"] == "graphframes"


def test_sample_hac_and_auto_eps(spark, make_cfg, vmf, caplog):
    x, _, ids, ui_exact = vmf
    cfg = make_cfg(*FAST, "locate_ui.method=sample-hac", "locate_ui.sample_hac_rows=1200",
                   "locate_ui.grid_sample_rows=1000", "locate_ui.eps_grid_start=0.3")
    write_embeddings(spark, cfg, x, ids)
    with caplog.at_level("DEBUG", logger="ers_spark.stages.locate_ui"):
        rec = run_locate_ui(spark, cfg)
    # INFO: the chosen eps, the rule and the largest clusters; the whole grid: one DEBUG record and the run record
    (chosen,) = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and "chose eps=" in r.getMessage()]
    assert "sampled rows (" in chosen and "largest clusters there [" in chosen
    (grid,) = [r.getMessage() for r in caplog.records if r.levelname == "DEBUG" and "per eps" in r.getMessage()]
    assert re.search(r"eps=0\.3(\s|\\t)+top sizes \[", grid)
    assert not any("top sizes [" in r.getMessage() for r in caplog.records if r.levelname == "INFO")
    table = rec["runtime"]["eps_size_table"]
    assert table[0]["eps"] == pytest.approx(0.3) and len(table) == grid.count("top sizes")
    assert any(row["eps"] == rec["params"]["eps_used"] for row in table)
    eps = rec["params"]["eps_used"]
    assert 0.3 <= eps <= 0.5
    row, members = _stored(spark, cfg, rec["params"]["uic_id"])
    assert row[METHOD] == "sample-hac" and rec["counts"]["sampled_rows"] == 1200
    # compare with exact single linkage restricted to the sampled rows, at the eps used
    member_idx = np.array([ids.index(m) for m in members])
    exact = exact_single_linkage(x, eps)
    lab, cnt = np.unique(exact, return_counts=True)
    exact_ui = set(np.flatnonzero(exact == lab[np.argmax(cnt)]).tolist())
    assert len(member_idx) > 0.5 * 1200 * len(ui_exact) / len(ids)
    # sampled members are a subset of the exact UI (single linkage on a subset can only split clusters)
    share = np.mean([i in exact_ui for i in member_idx])
    assert share >= 0.95


def test_no_dominant_cluster_writes_nothing(spark, make_cfg, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"u{i}" for i in range(len(x))]
    cfg = make_cfg(*FAST, "locate_ui.eps_grid_start=0.05", "locate_ui.eps_grid_stop=0.3")
    write_embeddings(spark, cfg, x, ids)
    with pytest.raises(ClusteringError) as err:
        run_locate_ui(spark, cfg)
    msg = str(err.value)
    assert "\n" not in msg and "eps=0.05: [" in msg and "eps=0.3: [" in msg
    assert table_version(spark, cfg, UI_CENTROIDS) is None and table_version(spark, cfg, UI_MEMBERS) is None
    # fixed eps, graph method: the full-data check raises too, nothing written
    cfg2 = make_cfg(*FAST, "locate_ui.eps=0.2")
    write_embeddings(spark, cfg2, x, ids)
    with pytest.raises(ClusteringError, match="no dominant cluster: top sizes"):
        run_locate_ui(spark, cfg2)
    assert table_version(spark, cfg2, UI_CENTROIDS) is None and table_version(spark, cfg2, UI_MEMBERS) is None


def test_a_table_far_larger_than_the_quantisers_sample_is_clustered_not_refused(spark, make_cfg, vmf):
    """The 1e9 case in small (a 160-row driver sample, 10 cells for 1,667 rows that would want 105): it used to
    stop with a config error; now every cell is counted and cut on the executors and the UI is found."""
    x, _, ids, ui_exact = vmf
    cfg = make_cfg("locate_ui.eps=0.4", "locate_ui.kmeans_sample_rows=160", "locate_ui.max_top_cells=10",
                   "locate_ui.max_cell_rows=64", "locate_ui.nprobe=2", "locate_ui.dominance_ratio=5")
    write_embeddings(spark, cfg, x, ids)
    rec = run_locate_ui(spark, cfg)
    _, members = _stored(spark, cfg, rec["params"]["uic_id"])
    assert rec["counts"]["cells"] == 10 and rec["counts"]["cut_cells"] == 10
    assert jaccard(members, [ids[i] for i in ui_exact]) >= 0.95


def test_from_members_with_rotated_model(spark, vmf, graph_run):
    x, _, ids, _ = vmf
    cfg, first = graph_run
    old_id = first["params"]["uic_id"]
    old_row, old_members = _stored(spark, cfg, old_id)
    q, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((x.shape[1], x.shape[1])))
    write_embeddings(spark, cfg, x @ q.T, ids, model=("rotated", "1"), at=datetime(2024, 1, 1) + timedelta(days=1))
    versions = (table_version(spark, cfg, UI_CENTROIDS), table_version(spark, cfg, UI_MEMBERS))

    with pytest.raises(ErsUserError, match="unknown uic_id 'nope'"):
        run_locate_ui(spark, make_cfg_same(cfg, "locate_ui.from_members=nope"))
    assert (table_version(spark, cfg, UI_CENTROIDS), table_version(spark, cfg, UI_MEMBERS)) == versions

    rec = run_locate_ui(spark, make_cfg_same(cfg, f"locate_ui.from_members={old_id}"))
    assert rec["params"]["model_name"] == "rotated" and len(rec["params"]["models_in_table"]) == 2
    row, members = _stored(spark, cfg, rec["params"]["uic_id"])
    assert row[METHOD] == f"from-members:{old_id}" and row[MODEL_NAME] == "rotated"
    assert row[EPS] == pytest.approx(old_row[EPS]) and sorted(members) == sorted(old_members)
    assert row[MEMBER_COUNT] == len(old_members) and row[TOP_CLUSTER_SIZES] == [len(old_members)]
    rotated_old = q @ np.asarray(old_row[CENTROID], np.float64)
    assert float(np.dot(rotated_old, np.asarray(row[CENTROID]))) >= 0.999


def make_cfg_same(cfg, *overrides: str):
    """The same lake and database with extra overrides."""
    return cfg.with_overrides(list(overrides))


# ----------------------------------------------------------------------------- real faces


def test_real_faces_degraded_copies_form_the_ui(spark, make_cfg, tmp_path):
    orl = SHARED_DATA / "orl_faces"
    if not orl.is_dir():
        pytest.skip(f"shared data {orl} is absent (real-face tests need ../shared/data next to the repo)")
    from PIL import Image

    from ers_spark.models.onnx_runner import OnnxEmbedder
    from ers_spark.models.preprocess import prepare_arrays
    from ers_spark.models.spec import load_model_spec, resolve_model_file
    from ers_spark.core.synthetic import DEGRADATIONS, degrade

    spec = load_model_spec("dlib_resnet_v1")
    embedder = OnnxEmbedder(resolve_model_file(spec, tmp_path / "models"), spec)
    paths = sorted(orl.glob("s*/*.pgm"))
    rng = np.random.default_rng(0)
    clean = [np.repeat(np.asarray(Image.open(p))[:, :, None], 3, axis=2) for p in paths]
    degraded = [degrade(img, DEGRADATIONS[i % len(DEGRADATIONS)], rng) for i, img in enumerate(clean)]
    vecs = [embedder.embed(prepare_arrays(clean[i : i + 100] + degraded[i : i + 100], spec))[0]
            for i in range(0, len(clean), 100)]
    n = len(clean)
    # embed in chunks keeping clean/degraded order: rebuild the two halves
    x_clean = np.concatenate([v[: len(v) // 2] for v in vecs])
    x_deg = np.concatenate([v[len(v) // 2 :] for v in vecs])
    x = np.concatenate([x_clean, x_deg])
    ids = [f"clean/{p.parent.name}/{p.name}" for p in paths] + [f"degraded/{p.parent.name}/{p.name}" for p in paths]
    cfg = make_cfg(
        # dlib on raw (unaligned) ORL crops: everything lies within cosine distance ~0.05, so the
        # README's "0.3" (euclidean on unit vectors = cosine 0.045) already merges all 800 rows;
        # a fine grid lets the eps rule stop before the degraded copies' cluster absorbs identities.
        "locate_ui.kmeans_cells=4", "locate_ui.nprobe=2", "locate_ui.dominance_ratio=3",
        "locate_ui.eps_grid_start=0.005", "locate_ui.eps_grid_stop=0.06", "locate_ui.eps_grid_step=0.0025",
    )
    write_embeddings(spark, cfg, x, ids, model=("dlib_resnet_v1", "1"))
    rec = run_locate_ui(spark, cfg)
    _, members = _stored(spark, cfg, rec["params"]["uic_id"])
    purity = np.mean([m.startswith("degraded/") for m in members])
    assert len(members) >= 0.45 * n and purity >= 0.9, (rec["params"]["eps_used"], len(members), purity)

    # the ORL faces as they are hold no unrecognizable image: with the default eps rule, no UI here, nothing
    # written (identities merge into each other from eps 0.03 on; before that no cluster dominates 5 to 1)
    clean_only = make_cfg("locate_ui.kmeans_cells=4", "locate_ui.nprobe=2")
    write_embeddings(spark, clean_only, x_clean, [f"as-is/{i}" for i in ids[:n]], model=("dlib_resnet_v1", "as-is"),
                     at=datetime(2025, 1, 1))  # the newest model version: the one locate-ui clusters
    before = table_version(spark, clean_only, UI_CENTROIDS)
    with pytest.raises(ClusteringError, match=r"^no UI here: identities stay separate up to eps=0\.0275 and no cluster"):
        run_locate_ui(spark, clean_only)
    assert table_version(spark, clean_only, UI_CENTROIDS) == before


def test_uic_reused_only_with_the_settings_it_was_made_with(spark, make_cfg, vmf):
    """A UIC is reused for the same embeddings version only when every setting that shapes the cluster
    is unchanged; a setting that only matters to another method does not force a new clustering."""
    x, _, ids, _ = vmf
    cfg = make_cfg(*FAST, "locate_ui.method=sample-hac", f"locate_ui.eps={RECOMMENDED_EPS}", "locate_ui.dominance_ratio=3")
    write_embeddings(spark, cfg, x[:400], ids[:400])
    first = run_locate_ui(spark, cfg)
    assert "reused" not in first["counts"] and first["params"]["settings_changed"] == []
    same = run_locate_ui(spark, make_cfg_same(cfg, "locate_ui.kmeans_cells=3", "locate_ui.nprobe=1"))
    assert same["counts"]["reused"] == 1 and same["params"]["uic_id"] == first["params"]["uic_id"]
    other = run_locate_ui(spark, make_cfg_same(cfg, "locate_ui.sample_hac_rows=300"))
    assert "reused" not in other["counts"] and other["params"]["settings_changed"] == ["sample_hac_rows"]
    assert other["params"]["uic_id"] != first["params"]["uic_id"]
    row, _ = _stored(spark, cfg, other["params"]["uic_id"])
    assert json.loads(row["cluster_params"])["sample_hac_rows"] == 300


def _points(spark, x: np.ndarray, partitions: int):
    import pyarrow as pa

    from ers_spark.distributed.arrow import arrow_lists

    table = pa.table({IMAGE_ID: [f"p{i:05d}" for i in range(x.shape[0])], EMBEDDING: arrow_lists(x, pa.float32())})
    return spark.createDataFrame(table).repartition(partitions)


def test_plan_for_a_table_a_hundred_times_larger_cuts_every_cell_the_same_way_whatever_the_partitioning(spark, make_cfg):
    """The 1e9 plan in small: the cells stay at max_top_cells, each gets the sub-cells its counted size asks for,
    trained on the executors from a seeded sample: the same plan from 1 or 3 partitions."""
    from ers_spark.core.cells import sub_cell_count
    from ers_spark.distributed.cells import quantiser_plan

    x, _ = vmf_embeddings(n_identities=200, per_identity=10, ui_share=0.1, seed=3)
    params = make_cfg("locate_ui.max_top_cells=8", "locate_ui.kmeans_sample_rows=128", "locate_ui.nprobe=2",
                      "locate_ui.max_cell_rows=8192").locate_ui
    n, sizing = x.shape[0], x.shape[0] * 100
    plans = [quantiser_plan(_points(spark, x, parts), n, params, sizing_rows=sizing) for parts in (1, 3)]
    (centres, plan), (centres_again, plan_again) = plans
    assert centres.shape[0] == 8 and np.array_equal(centres, centres_again)
    assert sorted(plan.sub_centres) == list(range(8)) and plan.offsets == plan_again.offsets
    assert all(np.array_equal(plan.sub_centres[c], plan_again.sub_centres[c]) for c in plan.sub_centres)
    average = sub_cell_count(sizing * 2 / 8, max_cell_rows=8192, nprobe=2)
    assert 0.5 * average * 8 <= plan.groups <= 2 * average * 8
