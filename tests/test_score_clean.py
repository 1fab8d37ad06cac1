"""Score and clean: ERS against a broadcast UIC, gamma calibration stored with the UIC, cleaned/quarantine tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ers_spark.core import ers as ers_math
from ers_spark.core import subcentres
from ers_spark.core.calibration import calibrate_gamma_held_out
from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.sql import functions as F

from ers_spark.config import load_config
from ers_spark.distributed.calibration import IMAGES_PER_IDENTITY, identity_sample
from ers_spark.distributed.subcentres import (
    calibrate_threshold, capped_rows, label_noise_flags, nearest_other_centres, whole_identity_frames,
)
from ers_spark.stages.clean import run_clean
from ers_spark.distributed.sampling import seeded_sample
from ers_spark.lake.contracts import CLEANED, EMBEDDINGS, QUARANTINE, SCORES, UI_CENTROIDS
from ers_spark.errors import ContractError
from ers_spark.lake.tables import read_table, table_path, table_version
from ers_spark.stages.score import run_score
from ers_spark.core.synthetic import vmf_embeddings
from stage_data import write_embeddings, write_uic

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def dataset():
    """6 identities x 12 images plus a diffuse UI cluster; one image of p0 is really p1 (label noise)."""
    emb, labels = vmf_embeddings(n_identities=6, per_identity=12, dim=64, ui_share=0.2, seed=11)
    ids = [f"img{i:03d}" for i in range(len(emb))]
    identities = [None if y < 0 else f"p{y}" for y in labels]
    wrong = int(np.flatnonzero(labels == 1)[0])
    identities[wrong] = "p0"
    ui_rows = np.flatnonzero(labels < 0)
    uic = ers_math.ui_centroid(emb[ui_rows])
    return {"emb": emb, "labels": labels, "ids": ids, "identities": identities, "wrong": ids[wrong],
            "ui_members": [ids[i] for i in ui_rows], "uic": uic}


def _table(spark, cfg, contract):
    return spark.read.format("delta").load(table_path(cfg, contract))


def test_enhanced_embedding_is_null_for_a_row_on_the_uic(spark, make_cfg, dataset) -> None:
    """A crop whose embedding is the UIC itself has no enhanced feature: null, and the job goes on."""
    cfg = make_cfg("score.gamma=0.5", "score.enhanced=true")
    ids = dataset["ids"][:5] + ["on_the_uic"]
    emb = np.vstack([dataset["emb"][:5], dataset["uic"][None, :]])
    write_embeddings(spark, cfg, ids, emb)
    write_uic(spark, cfg, dataset["uic"], dataset["ui_members"][:3])
    assert run_score(spark, cfg)["counts"]["scored"] == 6
    scores = _table(spark, cfg, SCORES).toPandas().set_index("image_id")
    assert scores.loc["on_the_uic", "enhanced_embedding"] is None
    assert scores.loc["on_the_uic", "ers"] < 1e-5 and not scores.loc["on_the_uic", "recognizable"]
    assert scores.drop(index="on_the_uic")["enhanced_embedding"].notna().all()


def _labelled_lake(spark, tmp_path_factory, dataset, name: str, *overrides: str):
    """A lake of the dataset's embeddings (with identities) and its UIC, scored once with ``overrides``.

    Shared by the tests of one setting (each run of a stage costs seconds); returns (cfg, uic_id, first score record).
    """
    folder = tmp_path_factory.mktemp(name)
    cfg = load_config(overrides=[f"storage.root={folder / 'lake'}", f"storage.database=ers_{name}",
                                 "spark.shuffle_partitions=2", f"spark.checkpoint_dir={folder / 'ckpt'}", *overrides])
    write_embeddings(spark, cfg, dataset["ids"], dataset["emb"], dataset["identities"])
    uic_id = write_uic(spark, cfg, dataset["uic"], dataset["ui_members"])
    return cfg, uic_id, run_score(spark, cfg)


@pytest.fixture(scope="module")
def fixed_gamma_lake(spark, tmp_path_factory, dataset):
    """gamma fixed at 0.5, enhanced features on. The fixed-gamma and clean tests read it; the re-run test,
    last in this file, moves it to a new UIC."""
    return _labelled_lake(spark, tmp_path_factory, dataset, "fixed_gamma", "score.gamma=0.5", "score.enhanced=true")


@pytest.fixture(scope="module")
def calibrated_lake(spark, tmp_path_factory, dataset):
    """gamma calibrated on the identities at FAR 0.05; the settings-change test, last in this file, recalibrates it."""
    return _labelled_lake(spark, tmp_path_factory, dataset, "calibrated", "score.target_far=0.05")


def test_score_fixed_gamma_matches_numpy(spark, fixed_gamma_lake, dataset) -> None:
    cfg, uic_id, record = fixed_gamma_lake
    n = len(dataset["ids"])
    assert record["counts"]["scored"] == n and record["counts"]["inserted"] == n
    assert record["counts"]["recognizable"] + record["counts"]["unrecognizable"] == n

    scores = _table(spark, cfg, SCORES).toPandas().set_index("image_id").loc[dataset["ids"]]
    expected_raw = 1.0 - dataset["emb"].astype(np.float64) @ dataset["uic"].astype(np.float64)
    np.testing.assert_allclose(scores["ers_raw"], expected_raw, atol=1e-5)
    np.testing.assert_allclose(scores["ers"], np.minimum(1.0, expected_raw), atol=1e-5)
    assert (scores["recognizable"] == (scores["ers"] >= 0.5)).all()
    assert set(scores["uic_id"]) == {uic_id} and set(scores["gamma"]) == {0.5}
    enhanced = np.stack(scores["enhanced_embedding"].to_numpy())
    np.testing.assert_allclose(enhanced, ers_math.enhance_embeddings(dataset["emb"], dataset["uic"]), atol=1e-5)
    np.testing.assert_allclose(enhanced @ dataset["uic"], 0.0, atol=1e-5)
    # UI members score low, identities high
    ui = scores.loc[dataset["ui_members"], "ers"]
    assert ui.max() < scores.drop(index=dataset["ui_members"])["ers"].min()


def test_gamma_calibrated_with_identities_and_stored(spark, calibrated_lake, dataset) -> None:
    cfg, uic_id, record = calibrated_lake
    (row,) = _table(spark, cfg, UI_CENTROIDS).where(f"uic_id = '{uic_id}'").collect()
    assert row.gamma_method == "pairs-frr-at-far"
    assert row.gamma == pytest.approx(record["params"]["gamma"])
    # chosen on half the identities (seeded), checked on the other half: the same function evaluate uses,
    # on up to IMAGES_PER_IDENTITY images of each identity
    sample = identity_sample(spark, cfg, read_table(spark, cfg, EMBEDDINGS), cfg.score)
    emb = np.stack(sample.embedding.to_numpy())
    expected, check = calibrate_gamma_held_out(
        emb, sample.identity.to_numpy(), ers_math.ers_scores(emb, dataset["uic"]),
        target_far=0.05, calibration_share=0.5, seed=0)
    assert record["params"]["gamma"] == pytest.approx(expected.gamma, abs=1e-6)
    details = record["params"]["gamma_calibration"]
    assert details["identities"] == 6 and details["rows"] == 6 * IMAGES_PER_IDENTITY
    assert (details["held_out"] is None) == (check is None)
    # the stored gamma is reused on the next run, not recalibrated
    assert run_score(spark, cfg)["params"]["gamma_method"] == "pairs-frr-at-far"


def test_calibration_sample_is_drawn_by_identity(spark, calibrated_lake) -> None:
    """calibration_sample_rows=20 -> two identities, every one of their (12) images capped at 10: whole identities."""
    cfg = calibrated_lake[0].with_overrides(["score.calibration_sample_rows=20"])
    sample = identity_sample(spark, cfg, read_table(spark, cfg, EMBEDDINGS), cfg.score)
    per_identity = sample.groupby("identity").size()
    assert len(per_identity) == 2 and (per_identity == IMAGES_PER_IDENTITY).all()
    again = identity_sample(spark, cfg, read_table(spark, cfg, EMBEDDINGS).repartition(5), cfg.score)
    assert sorted(again.image_id) == sorted(sample.image_id)  # seeded, not the first rows


def test_gamma_calibrated_without_labels(spark, make_cfg, dataset, caplog) -> None:
    cfg = make_cfg("score.calibration=unlabelled")
    write_embeddings(spark, cfg, dataset["ids"], dataset["emb"], None)
    write_uic(spark, cfg, dataset["uic"], dataset["ui_members"])
    with caplog.at_level("INFO", logger="ers_spark.stages.score"):
        record = run_score(spark, cfg)
    scores = _table(spark, cfg, SCORES).toPandas().set_index("image_id")
    gamma = record["params"]["gamma"]
    # the unlabelled rule separates UI members from identities on this clean synthetic data
    assert (scores.loc[dataset["ui_members"], "ers"] < gamma).all()
    assert (scores.drop(index=dataset["ui_members"])["ers"] >= gamma).all()
    # what it measures is the split of UI members and other rows, not error rates derived from that split
    assert record["params"]["gamma_calibration"] == {"rows": len(dataset["ids"]), "ui_members_below_gamma": 1.0,
                                                     "other_rows_below_gamma": 0.0}
    assert "not error rates" in caplog.text and "frr=" not in caplog.text


def test_score_without_uic_is_a_clear_error(spark, make_cfg, dataset) -> None:
    cfg = make_cfg()
    write_embeddings(spark, cfg, dataset["ids"][:5], dataset["emb"][:5])
    with pytest.raises(ContractError, match="input table 'ui_centroids' not found .*run `ers-spark locate-ui` first"):
        run_score(spark, cfg)


def test_clean_counts_add_up_and_label_noise(spark, fixed_gamma_lake, dataset) -> None:
    cfg = fixed_gamma_lake[0]
    record = run_clean(spark, cfg)
    c = record["counts"]
    n = len(dataset["ids"])
    assert c["scored"] == n == c["cleaned"] + c["quarantined"]
    assert c["quarantined"] == c["unrecognizable"] + c["label_noise"]
    assert c["unrecognizable"] == len(dataset["ui_members"])
    quarantine = _table(spark, cfg, QUARANTINE).where("stage = 'clean'").toPandas().set_index("image_id")
    assert set(quarantine.index[quarantine.reason == "unrecognizable"]) == set(dataset["ui_members"])
    assert list(quarantine.index[quarantine.reason == "label_noise"]) == [dataset["wrong"]]
    cleaned = _table(spark, cfg, CLEANED).toPandas()
    assert len(cleaned) == c["cleaned"] and dataset["wrong"] not in set(cleaned.image_id)

    props = spark.sql(f"SHOW TBLPROPERTIES delta.`{table_path(cfg, CLEANED)}`").toPandas().set_index("key")["value"]
    assert props["ers.model_name"] == "synthetic" and props["ers.model_version"] == "1"
    assert props["ers.uic_id"] == cleaned.uic_id.iloc[0]

    # re-run: no row changes
    again = run_clean(spark, cfg)
    assert again["counts"]["cleaned_changed"] == 0 and again["counts"]["quarantine_changed"] == 0


def _labelled(spark, dataset):
    rows = [(i, p, [float(x) for x in v]) for i, p, v in zip(dataset["ids"], dataset["identities"], dataset["emb"]) if p]
    return spark.createDataFrame(rows, "image_id string, identity string, embedding array<float>")


def test_calibrated_threshold_is_the_impostor_percentile_of_the_samples(spark, dataset) -> None:
    """The threshold equals numpy's percentile of every (sampled image, sampled other centre) angle."""
    params = load_config(overrides=["clean.calibration_sample_rows=40", "clean.calibration_identities=4"]).clean
    labelled = _labelled(spark, dataset)
    centres = {}
    for identity in sorted(set(p for p in dataset["identities"] if p)):
        rows = [e for e, p in zip(dataset["emb"], dataset["identities"]) if p == identity]
        k = subcentres.subcentre_count(len(rows), params.subcenters, params.min_images_per_subcenter)
        centres[identity] = subcentres.dominant_subcentre(np.array(rows), k, seed=params.seed)[0]
    centre_rows = spark.createDataFrame([(k, [float(x) for x in v]) for k, v in centres.items()],
                                        "identity string, _centre array<float>")
    threshold = calibrate_threshold(labelled, centre_rows, params)
    sampled_ids = [r.identity for r in seeded_sample(centre_rows, "identity", 4, params.seed).collect()]
    images = seeded_sample(labelled, "image_id", 40, params.seed).toPandas()
    assert len(sampled_ids) == 4 and len(images) == 40
    angles = subcentres.impostor_angles(np.stack(images.embedding), images.identity.to_numpy(),
                                      np.stack([centres[i] for i in sampled_ids]), np.array(sampled_ids))
    assert threshold == pytest.approx(np.percentile(angles, params.impostor_percentile, method="inverted_cdf"), abs=1e-4)


def _expected_flags(dataset, params, threshold, extra=()):
    """numpy: per image, far from its own clean group (core keep mask) and within the median own angle of another's."""
    emb = list(dataset["emb"]) + [e for _, _, e in extra]
    names = list(dataset["ids"]) + [i for i, _, _ in extra]
    identities = list(dataset["identities"]) + [p for _, p, _ in extra]
    far, own, centres = {}, {}, {}
    for identity in sorted(set(p for p in identities if p)):
        idx = [i for i, p in enumerate(identities) if p == identity]
        k = subcentres.subcentre_count(len(idx), params.subcenters, params.min_images_per_subcenter)
        keep, angles, centres[identity] = subcentres.subcenter_label_noise(np.array([emb[i] for i in idx]), k=k,
                                                                          max_angle_deg=threshold, seed=params.seed)
        far.update({names[i]: not ok for i, ok in zip(idx, keep)})
        own.update({names[i]: a for i, a in zip(idx, angles)})
    claim = np.percentile(list(own.values()), params.genuine_percentile)
    labelled = [i for i, p in enumerate(identities) if p]
    other, _ = subcentres.nearest_other_centre(np.array([emb[i] for i in labelled]), [identities[i] for i in labelled],
                                             np.stack(list(centres.values())), list(centres))
    return {names[i]: bool(far[names[i]] and o <= claim) for i, o in zip(labelled, other)}, claim


def test_label_noise_needs_far_from_its_own_and_claimed_by_another(spark, dataset) -> None:
    """The stage flags what numpy does; a UI (degraded-like) image labelled p2 is far from p2 but nobody's: kept."""
    params = load_config(overrides=["clean.max_angle_deg=30"]).clean
    degraded = ("degraded_p2", "p2", dataset["uic"])
    labelled = _labelled(spark, dataset).unionByName(spark.createDataFrame(
        [(degraded[0], degraded[1], [float(x) for x in degraded[2]])], "image_id string, identity string, embedding array<float>"))
    check = label_noise_flags(labelled, params)
    expected, claim = _expected_flags(dataset, params, 30.0, extra=[degraded])
    assert check.max_angle_deg == 30.0 and check.claim_angle_deg == pytest.approx(claim, abs=0.5)
    expected_df = spark.createDataFrame(sorted(expected.items()), "image_id string, _label_noise boolean")
    assert_df_equality(check.flags.select("image_id", "_label_noise"), expected_df, ignore_row_order=True,
                       ignore_nullable=True)
    flagged = check.flags.where("_label_noise").collect()
    assert [(r.image_id, r._other_identity) for r in flagged] == [(dataset["wrong"], "p1")]
    (far_only,) = check.flags.where("image_id = 'degraded_p2'").collect()
    assert far_only.subcenter_angle_deg > 30.0 and not far_only._label_noise
    check.unpersist()


def test_identities_above_the_cap_are_checked_against_a_centre_from_capped_rows(spark, dataset) -> None:
    """clean.max_identity_rows=8 (identities hold 12): sub-centres from the seeded capped rows, every row measured."""
    params = load_config(overrides=["clean.max_angle_deg=30", "clean.max_identity_rows=8"]).clean
    labelled = _labelled(spark, dataset)
    fit = capped_rows(labelled, params).toPandas()
    sizes = fit.groupby("identity").size()
    assert len(sizes) == 6 and sizes.sum() < len(labelled.collect())  # a seeded part of each identity
    check = label_noise_flags(labelled, params)
    got = check.flags.select("image_id", "subcenter_angle_deg").toPandas().set_index("image_id")["subcenter_angle_deg"]
    for identity, rows in fit.groupby("identity"):
        k = subcentres.subcentre_count(len(rows), params.subcenters, params.min_images_per_subcenter)
        centre = subcentres.dominant_subcentre(np.stack(rows.embedding), k, seed=params.seed)[0]
        mine = [i for i, p in zip(dataset["ids"], dataset["identities"]) if p == identity]
        emb = dataset["emb"][[dataset["ids"].index(i) for i in mine]]
        expected = subcentres.row_angles(emb, np.repeat(centre[None, :], len(mine), axis=0))
        np.testing.assert_allclose(got.loc[mine].to_numpy(), expected, atol=1e-3)
    assert [r.image_id for r in check.flags.where("_label_noise").collect()] == [dataset["wrong"]]
    check.unpersist()


def test_label_noise_decides_the_same_whatever_order_the_rows_arrive_in(spark, dataset) -> None:
    """The sub-centre k-means starts from rows in image_id order, not shuffle order: the rows reversed and
    scattered over other partitions give the same angles and flags (a recomputed ``decided`` agrees
    with the counted one)."""
    from pyspark.sql import functions as F

    params = load_config(overrides=["clean.max_angle_deg=30"]).clean
    labelled = _labelled(spark, dataset)
    results = []
    for rows in (labelled.coalesce(1), labelled.orderBy(F.desc("image_id")).repartition(3, F.xxhash64("image_id"))):
        check = label_noise_flags(rows, params)
        results.append(check.flags.select("image_id", "subcenter_angle_deg", "_label_noise").toPandas()
                       .sort_values("image_id").reset_index(drop=True))
        check.unpersist()
    np.testing.assert_array_equal(results[0]["subcenter_angle_deg"], results[1]["subcenter_angle_deg"])
    assert results[0]["_label_noise"].tolist() == results[1]["_label_noise"].tolist()


@pytest.mark.parametrize("cuts, expected", [
    ([["a", "a", "b"], ["b", "c"]], [["a", "a"], ["b", "b"], ["c"]]),
    ([["a"], ["a"], ["a"]], [["a", "a", "a"]]),
    ([["a", "b", "c"]], [["a", "b"], ["c"]]),
    ([[], ["a", "b"], []], [["a"], ["b"]]),
    ([], []),
])
def test_whole_identity_frames_never_split_an_identity(cuts, expected) -> None:
    """Row-count batches of a sorted partition come back as frames of whole identities, rows in order."""
    import pandas as pd

    frames = list(whole_identity_frames(pd.DataFrame({"identity": c, "row": range(len(c))}) for c in cuts))
    assert [list(f["identity"]) for f in frames] == expected
    assert sum(len(f) for f in frames) == sum(len(c) for c in cuts)


def test_label_noise_is_the_same_when_arrow_batches_split_identities(spark, dataset) -> None:
    """Arrow batches of 5 rows cut every 12-image identity; many identities per call give the same angles."""
    params = load_config(overrides=["clean.max_angle_deg=30"]).clean
    labelled = _labelled(spark, dataset)
    whole = label_noise_flags(labelled, params)
    expected = whole.flags.select("image_id", "subcenter_angle_deg", "_label_noise").toPandas()
    whole.unpersist()
    before = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "5")
    try:
        cut = label_noise_flags(labelled, params)
        got = cut.flags.select("image_id", "subcenter_angle_deg", "_label_noise").toPandas()
        cut.unpersist()
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", before)
    merged = expected.merge(got, on="image_id", suffixes=("", "_cut"))
    assert len(merged) == len(expected) == len(got)
    np.testing.assert_allclose(merged["subcenter_angle_deg_cut"], merged["subcenter_angle_deg"], atol=1e-6)
    assert (merged["_label_noise_cut"] == merged["_label_noise"]).all()


@pytest.mark.parametrize("cell_rows", [1, 2, 1024])
def test_nearest_other_centres_equal_numpy_when_every_cell_is_probed(spark, dataset, cell_rows) -> None:
    """7 centres in 7, 4 or 1 cells, all probed (nprobe 8): numpy's nearest centre of another identity, per candidate."""
    from ers_spark.distributed.identity_index import NPROBE, OTHER_COS, OTHER_IDENTITY, nearest_other_entries

    rng = np.random.default_rng(cell_rows)
    centres = ers_math.normalize_rows(rng.normal(size=(7, 64)))
    names = [f"c{i}" for i in range(7)]
    pick = list(range(0, len(dataset["ids"]), 9))
    own = [names[i % 7] for i in pick]
    candidates = spark.createDataFrame(
        [(dataset["ids"][i], o, [float(x) for x in dataset["emb"][i]]) for i, o in zip(pick, own)],
        "image_id string, identity string, embedding array<float>")
    centre_df = spark.createDataFrame([(n, [float(x) for x in c]) for n, c in zip(names, centres)],
                                      "identity string, _centre array<float>")
    assert -(-7 // cell_rows) <= NPROBE
    got = nearest_other_entries(candidates, "image_id", "embedding", centre_df, "_centre", seed=0, cell_rows=cell_rows)
    got = got.select("image_id", F.degrees(F.acos(OTHER_COS)).alias("angle"), F.col(OTHER_IDENTITY).alias("who"))
    angles, who = subcentres.nearest_other_centre(dataset["emb"][pick], own, centres, names)
    expected = spark.createDataFrame([(dataset["ids"][i], float(a), w) for i, a, w in zip(pick, angles, who)],
                                     got.schema)
    assert_approx_df_equality(got, expected, 1e-7, ignore_row_order=True, ignore_nullable=True)
    default = nearest_other_centres(candidates, centre_df, seed=0)  # what clean calls: the same, as angles
    assert_approx_df_equality(default.toDF("image_id", "angle", "who"), expected, 1e-7, ignore_row_order=True,
                              ignore_nullable=True)


def test_nearest_other_identity_through_cells_finds_the_true_person_of_a_mislabelled_image(spark) -> None:
    """300 identities in 38 cells, each image probing 2 (the shuffle: images x 2 + centres). Every image with another
    identity's centre within 30 degrees (the claim angle is about 20) finds numpy's nearest one, each image moved into
    another person's folder among them; a farther one may be missed, never reported nearer than it is."""
    from ers_spark.core.synthetic import vmf_embeddings
    from ers_spark.distributed.identity_index import OTHER_COS, OTHER_IDENTITY, nearest_other_entries

    x, y = vmf_embeddings(n_identities=300, per_identity=10, ui_share=0.0, seed=7)
    names = np.array([f"p{v}" for v in y], dtype=object)
    centre_names = [f"p{v}" for v in np.unique(y)]
    centres = ers_math.normalize_rows(np.stack([x[y == v].mean(axis=0) for v in np.unique(y)]))
    labels = names.copy()
    every_50th = np.arange(0, x.shape[0], 50)
    labels[every_50th] = np.roll(names[every_50th], 1)  # each wears the label of the image 50 before it
    moved = every_50th[labels[every_50th] != names[every_50th]]
    ids = [f"i{i:05d}" for i in range(x.shape[0])]
    images = spark.createDataFrame(pd.DataFrame({"image_id": ids, "identity": labels, "embedding": list(x.astype(float))}))
    centre_df = spark.createDataFrame(pd.DataFrame({"identity": centre_names, "_centre": list(centres.astype(float))}))
    got = nearest_other_entries(images, "image_id", "embedding", centre_df, "_centre", seed=0, cell_rows=8, nprobe=2)
    got = got.toPandas().set_index("image_id").reindex(ids)
    angle, truth = subcentres.nearest_other_centre(x, labels, centres, centre_names)
    found = np.degrees(np.arccos(np.clip(got[OTHER_COS].to_numpy(float), -1, 1)))
    near = angle <= 30
    assert len(moved) >= 50 and near[moved].all() and (truth[moved] == names[moved]).all()
    assert (got[OTHER_IDENTITY].to_numpy()[near] == truth[near]).all()
    np.testing.assert_allclose(found[near], angle[near], atol=1e-6)
    assert (found[~np.isnan(found)] >= angle[~np.isnan(found)] - 1e-6).all()


def test_stored_gamma_reused_only_with_the_settings_it_was_calibrated_with(spark, calibrated_lake) -> None:
    """A changed score.target_far calibrates gamma again (the run says which setting changed); unchanged reuses it.
    Last of the calibrated lake's tests: it stores a gamma for other settings."""
    cfg, uic_id, first = calibrated_lake
    assert first["params"]["gamma_settings_changed"] == []
    version = table_version(spark, cfg, UI_CENTROIDS)
    again = run_score(spark, cfg)
    assert again["params"]["gamma"] == first["params"]["gamma"] and again["params"]["gamma_settings_changed"] == []
    assert table_version(spark, cfg, UI_CENTROIDS) == version  # reused: nothing stored again
    changed = run_score(spark, cfg.with_overrides(["score.target_far=0.2"]))
    assert changed["params"]["gamma_settings_changed"] == ["target_far"]
    (row,) = _table(spark, cfg, UI_CENTROIDS).where(f"uic_id = '{uic_id}'").collect()
    assert json.loads(row.gamma_params)["target_far"] == 0.2 and row.gamma == changed["params"]["gamma"]


def test_score_rerun_changes_nothing_and_new_uic_rescores(spark, fixed_gamma_lake, dataset) -> None:
    """Last of the fixed-gamma lake's tests: it moves the lake to a new UIC."""
    cfg = fixed_gamma_lake[0]
    version = table_version(spark, cfg, SCORES)
    again = run_score(spark, cfg)
    assert again["counts"]["inserted"] == 0 and again["counts"]["rescored"] == 0
    assert table_version(spark, cfg, SCORES) == version

    rotated = ers_math.normalize_rows((dataset["uic"] + 0.3 * dataset["emb"][0])[None, :])[0]
    new_uic = write_uic(spark, cfg, rotated, dataset["ui_members"][:3], minutes=5)
    third = run_score(spark, cfg)
    assert third["counts"]["rescored"] == len(dataset["ids"])
    now = _table(spark, cfg, SCORES)
    assert {r.uic_id for r in now.select("uic_id").distinct().collect()} == {new_uic}
    old = spark.read.format("delta").option("versionAsOf", version).load(table_path(cfg, SCORES))
    assert old.where(old.uic_id == new_uic).count() == 0 and old.count() == len(dataset["ids"])
    props = spark.sql(f"SHOW TBLPROPERTIES delta.`{table_path(cfg, SCORES)}`").toPandas().set_index("key")["value"]
    assert props["ers.uic_id"] == new_uic
