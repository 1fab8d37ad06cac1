"""Embed stage inside Spark: unit vectors per crop, incremental re-runs, quarantine, any ONNX model by spec."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ers_spark.lake.contracts import CROPS, EMBEDDINGS, QUARANTINE
from ers_spark.demo import demo_records
from ers_spark.config import load_config
from ers_spark.distributed.inference import ModelFile, embed_images, resolve_model
from ers_spark.stages.embed import pending_crops, run_embed
from ers_spark.errors import ConfigError, ModelError
from ers_spark.stages.ingest import run_ingest
from ers_spark.lake.tables import merge_insert_new, read_table, table_path
from ers_spark.models.onnx_runner import OnnxEmbedder
from ers_spark.models.preprocess import decode_batch
from conftest import shared_data_dir
from onnx_builders import tiny_embedding_model

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def demo_rows() -> pd.DataFrame:
    rows = demo_records()
    return pd.concat([rows[rows.identity == "astronaut"], rows[rows.kind == "non_face"].head(6)]).reset_index(drop=True)


def _write_parquet(rows: pd.DataFrame, path: Path) -> Path:
    rows[["path", "identity", "bytes"]].to_parquet(path)
    return path


def _ingest(spark, cfg) -> None:
    run_ingest(spark, cfg)


def _parquet_cfg(make_cfg, src: Path, *extra: str):
    return make_cfg(
        f"ingest.input_path={src}", "ingest.input_format=parquet", "ingest.path_column=path",
        "ingest.identity_column=identity", *extra,
    )


def test_embed_matches_direct_inference_and_is_incremental(spark, make_cfg, demo_rows, tmp_path, caplog) -> None:
    first, second = demo_rows.iloc[:10], demo_rows
    cfg = _parquet_cfg(make_cfg, _write_parquet(first, tmp_path / "a.parquet"))
    _ingest(spark, cfg)
    record = run_embed(spark, cfg)
    assert record["counts"] == {"crops": 10, "already_embedded": 0, "to_embed": 10, "written": 10, "quarantined": 0}
    # tasks read the model from the copy Spark shipped them, not from the driver's path; the log says where they ran
    runtime = record["runtime"]
    assert runtime["model_copies"] and all("userFiles" in p for p in runtime["model_copies"])
    assert resolve_model(cfg.embed).model_path not in runtime["model_copies"]
    assert set(runtime["tasks_by_device"]) == {"cpu CPUExecutionProvider"}

    table = spark.read.format("delta").load(table_path(cfg, EMBEDDINGS)).toPandas()
    emb = np.stack(table["embedding"].to_numpy())
    assert emb.shape == (10, 128)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert (table["raw_norm"] > 0).all()
    assert set(table["model_name"]) == {"dlib_resnet_v1"}

    # the same numbers as running the model directly, outside Spark
    params = resolve_model(cfg.embed)
    crops = spark.read.format("delta").load(table_path(cfg, CROPS)).select("image_id", "bytes").toPandas()
    batch, ok, _ = decode_batch(list(crops["bytes"]), params.spec)
    direct, norms = OnnxEmbedder(params.model_path, params.spec).embed(batch)
    by_id = dict(zip(table["image_id"], emb))
    for image_id, vec in zip(crops["image_id"], direct):
        assert float(np.dot(by_id[image_id], vec)) > 0.99999

    # re-run: nothing new
    again = run_embed(spark, cfg)
    assert again["counts"]["to_embed"] == 0 and again["counts"]["written"] == 0
    assert again["output_versions"]["embeddings"] == record["output_versions"]["embeddings"]

    # new crops: only those are embedded
    cfg2 = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, input_path=str(_write_parquet(second, tmp_path / "b.parquet"))))
    _ingest(spark, cfg2)
    with caplog.at_level("INFO", logger="ers_spark.stages.embed"):
        more = run_embed(spark, cfg2)
    assert more["counts"]["to_embed"] == len(second) - 10
    assert more["counts"]["already_embedded"] == 10
    assert f"embed: {len(second) - 10} new crops to embed" in caplog.text
    assert spark.read.format("delta").load(table_path(cfg, EMBEDDINGS)).count() == len(second)


def test_undecodable_crop_goes_to_quarantine(spark, make_cfg, demo_rows, tmp_path) -> None:
    cfg = make_cfg()
    good = demo_rows.iloc[0]
    now = datetime(2026, 1, 1)
    rows = [
        ("good", "a.png", "astronaut", 160, 160, "png", good["bytes"], now),
        ("broken", "b.png", None, 10, 10, "png", b"\x89PNG broken", now),
    ]
    merge_insert_new(spark, cfg, CROPS, spark.createDataFrame(rows, CROPS.schema))
    record = run_embed(spark, cfg)
    assert record["counts"] == {"crops": 2, "already_embedded": 0, "to_embed": 2, "written": 1, "quarantined": 1}
    (q,) = spark.read.format("delta").load(table_path(cfg, QUARANTINE)).collect()
    assert (q.image_id, q.stage, q.reason) == ("broken", "embed", "embed_failed")
    assert q.detail.startswith("undecodable image")
    assert q.model_version == record["params"]["model_version"]  # tagged with the model that failed on it
    # a re-run with the same model does not retry or duplicate it
    assert run_embed(spark, cfg)["counts"]["to_embed"] == 0
    # a new model version tries it again (and it fails again, recorded under that version)
    model = tiny_embedding_model(tmp_path / "v2.onnx", size=150, dim=128)
    spec_path = tmp_path / "v2.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "dlib_resnet_v1", "version": "2", "onnx_path": str(model), "input_height": 150, "input_width": 150,
        "mean": [0.0] * 3, "std": [255.0] * 3, "embedding_dim": 128,
    }))
    cfg2 = dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, model=str(spec_path)))
    retried = run_embed(spark, cfg2)
    assert retried["counts"]["to_embed"] == 2 and retried["counts"]["quarantined"] == 1
    versions = {r.model_version for r in spark.read.format("delta").load(table_path(cfg, QUARANTINE)).collect()}
    assert versions == {record["params"]["model_version"], retried["params"]["model_version"]}


def _exchanges_under_anti_joins(plan) -> list:
    """Every Exchange node between a LeftAnti join and the next join below it (JVM plan nodes, via py4j)."""
    found, stack = [], [(plan, False)]
    while stack:
        node, under_anti = stack.pop()
        name = node.nodeName()
        is_join = "Join" in name
        if is_join:
            under_anti = "LeftAnti" in node.joinType().toString()
        elif under_anti and name == "Exchange":
            found.append(node)
        children = node.children()
        stack.extend((children.apply(i), under_anti) for i in range(children.size()))
    return found


def test_pending_work_is_found_from_ids_only(spark, make_cfg, demo_rows) -> None:
    """The anti-joins that find pending crops shuffle ids, never image bytes (physical plan with shuffle joins,
    as on tables too big to broadcast); the bytes are joined once, to the pending rows."""
    cfg = make_cfg()
    now = datetime(2026, 1, 1)
    good = demo_rows.iloc[0]
    rows = [("a", "a.png", "astronaut", 160, 160, "png", good["bytes"], now),
            ("b", "b.png", None, 10, 10, "png", b"\x89PNG broken", now)]
    merge_insert_new(spark, cfg, CROPS, spark.createDataFrame(rows, CROPS.schema))
    run_embed(spark, cfg)  # writes embeddings (a) and quarantine (b): both anti-joins take part
    merge_insert_new(spark, cfg, CROPS, spark.createDataFrame(
        [("c", "c.png", "astronaut", 160, 160, "png", good["bytes"] + b"\0", now)], CROPS.schema))
    previous = {k: spark.conf.get(k) for k in ("spark.sql.adaptive.enabled", "spark.sql.autoBroadcastJoinThreshold")}
    spark.conf.set("spark.sql.adaptive.enabled", "false")  # plan the exchanges up front ...
    spark.conf.set("spark.sql.autoBroadcastJoinThreshold", "-1")  # ... as shuffles, as on a big table
    try:
        pending = pending_crops(spark, cfg, read_table(spark, cfg, CROPS), resolve_model(cfg.embed))
        exchanges = _exchanges_under_anti_joins(pending._jdf.queryExecution().executedPlan())
        assert exchanges, pending._jdf.queryExecution().executedPlan().toString()
        for exchange in exchanges:
            types = [exchange.output().apply(i).dataType().typeName() for i in range(exchange.output().size())]
            assert "binary" not in types, exchange.toString()
        assert [r.image_id for r in pending.collect()] == ["c"]
    finally:
        for key, value in previous.items():
            spark.conf.set(key, value)


def _model() -> ModelFile:
    from ers_spark.models.spec import load_model_spec

    return ModelFile(spec=load_model_spec("dlib_resnet_v1"), model_path="unused", model_sha256="0" * 64, model_version="1")


def _embed_cfg(**changes):
    base = dict(backend="onnx", device="cpu", batch_size=4, intra_op_threads=1, fp16=False)
    return dataclasses.replace(load_config().embed, **{**base, **changes})


def test_model_exception_is_a_job_failure_not_bad_data(demo_rows) -> None:
    """An exception of the model itself propagates (the task fails); only undecodable bytes become reasons."""

    class BrokenEmbedder:
        def embed(self, batch):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    images = list(demo_rows["bytes"].iloc[:3]) + [b""]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        embed_images(images, _model(), _embed_cfg(), BrokenEmbedder())

    class NanForSecond:
        def embed(self, batch):
            unit = np.ones((len(batch), 128), np.float32) / np.sqrt(128)
            norms = np.ones(len(batch), np.float32)
            norms[1] = np.nan
            return unit, norms

    out = embed_images(images, _model(), _embed_cfg(), NanForSecond())
    assert out.reasons == [None, "model returned a zero or non-finite embedding", None, "empty image (0 bytes)"]
    assert np.isnan(out.unit[3]).all() and np.isfinite(out.norms[[0, 2]]).all()
    assert out.aligned is None and out.faces is None  # the model file declares no alignment here


def test_missing_dlib_fails_alignment_instead_of_quarantining(monkeypatch, demo_rows) -> None:
    """Without dlib on an executor, alignment raises (a broken job), never 'no face' for every crop."""
    from ers_spark.distributed.align import align_images
    from ers_spark.models import align
    from ers_spark.models.spec import FaceAlignment

    def no_dlib(landmarks=5):
        raise ModelError("face alignment needs dlib: pip install dlib-bin (a dependency of ers-spark)")

    monkeypatch.setattr(align, "_dlib_models", no_dlib)
    with pytest.raises(ModelError, match="face alignment needs dlib"):
        align_images(list(demo_rows["bytes"].iloc[:2]), FaceAlignment("dlib_chip"), 150, 150, True)
    out = align_images([b"not an image", None], FaceAlignment("dlib_chip"), 150, 150, True)
    assert out.reasons[0].startswith("undecodable image") and out.reasons[1] == "missing image (null bytes)"
    assert out.chips == [None, None] and not out.aligned.any()


@pytest.mark.parametrize(
    ("failed", "rows", "fails"),
    [(0, 100, False), (50, 100, False), (51, 100, True), (9, 9, False), (10, 10, True), (5, 10, False)],
)
def test_partition_with_mostly_failures_fails_the_task(failed, rows, fails) -> None:
    from ers_spark.distributed.inference import check_failed_share

    if fails:
        with pytest.raises(ModelError, match=f"{failed} of {rows} crops in one partition failed"):
            check_failed_share(failed, rows, "undecodable image", _embed_cfg())
    else:
        check_failed_share(failed, rows, "undecodable image", _embed_cfg())


def test_broken_model_fails_the_stage_and_quarantines_nothing(spark, make_cfg, demo_rows, tmp_path) -> None:
    """A corrupt model file: ModelError before any crop is touched (the CLI prints it in one line, exit 2)."""
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model" * 50)
    spec_path = tmp_path / "corrupt.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "corrupt", "onnx_path": str(corrupt), "input_height": 112, "input_width": 112,
        "mean": [127.5] * 3, "std": [127.5] * 3, "embedding_dim": 512,
    }))
    cfg = _parquet_cfg(make_cfg, _write_parquet(demo_rows.iloc[:3], tmp_path / "c.parquet"), f"embed.model={spec_path}")
    _ingest(spark, cfg)
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        run_embed(spark, cfg)
    from delta.tables import DeltaTable

    assert spark.read.format("delta").load(table_path(cfg, QUARANTINE)).count() == 0  # ingest made it, empty
    assert not DeltaTable.isDeltaTable(spark, table_path(cfg, EMBEDDINGS))


def test_112_spec_runs_end_to_end(spark, make_cfg, demo_rows, tmp_path) -> None:
    model = tiny_embedding_model(tmp_path / "arc.onnx", size=112, dim=512)
    spec_path = tmp_path / "my_arcface.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "my_arcface", "version": "2", "onnx_path": str(model), "input_height": 112, "input_width": 112,
        "channel_order": "RGB", "mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5], "layout": "NCHW",
        "embedding_dim": 512,
    }))
    src = _write_parquet(demo_rows.iloc[:6], tmp_path / "c.parquet")
    cfg = _parquet_cfg(make_cfg, src, f"embed.model={spec_path}")
    _ingest(spark, cfg)
    record = run_embed(spark, cfg)
    assert record["counts"]["written"] == 6
    table = spark.read.format("delta").load(table_path(cfg, EMBEDDINGS)).toPandas()
    emb = np.stack(table["embedding"].to_numpy())
    assert emb.shape == (6, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert set(table["model_name"]) == {"my_arcface"}
    assert all(v.startswith("2+") for v in table["model_version"])


def test_bad_model_spec_fails_before_spark_work(make_cfg, tmp_path) -> None:
    spec_path = tmp_path / "missing.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "gone", "onnx_path": str(tmp_path / "nope.onnx"), "input_height": 112, "input_width": 112,
        "mean": [127.5] * 3, "std": [127.5] * 3, "embedding_dim": 512,
    }))
    with pytest.raises(ModelError, match="model file not found"):
        resolve_model(make_cfg(f"embed.model={spec_path}").embed)
    model = tiny_embedding_model(tmp_path / "x.onnx")
    spec_path.write_text(yaml.safe_dump({
        "name": "wrongsum", "onnx_path": str(model), "input_height": 112, "input_width": 112,
        "mean": [127.5] * 3, "std": [127.5] * 3, "embedding_dim": 512, "sha256": "0" * 64,
    }))
    with pytest.raises(ModelError, match="checksum mismatch"):
        resolve_model(make_cfg(f"embed.model={spec_path}").embed)
    with pytest.raises(ConfigError, match="embed.fp16 needs embed.backend=torch"):
        resolve_model(make_cfg("embed.fp16=true").embed)


def _table_or_empty(spark, cfg, contract):
    from ers_spark.lake.tables import ensure_table

    ensure_table(spark, cfg, contract)
    return spark.read.format("delta").load(table_path(cfg, contract))


def _photos() -> list[tuple[str, bytes]]:
    """The astronaut (one face), coffee (none) and, with the shared data, a couple's photo (two faces)."""
    import io

    import skimage.data
    from PIL import Image

    from conftest import SHARED_DATA

    def png(array) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    photos = [("astronaut.png", png(skimage.data.astronaut())), ("coffee.png", png(skimage.data.coffee()))]
    couple = SHARED_DATA / "deepface_photos" / "couple.jpg"
    if couple.is_file():
        photos.append(("couple.jpg", couple.read_bytes()))
    return photos


def test_default_alignment_embeds_each_crops_largest_face_in_one_pass(spark, make_cfg, tmp_path) -> None:
    """The default (`embed.align: auto`): the dlib spec's 150 px chip of each crop's largest face is what the
    model sees, in the embed pass itself: crops gains no row, the embedding equals the model run on
    `align_faces`' chip outside Spark, and a crop without a face is embedded as a centred resize
    (`aligned = false`). The version names the alignment, so `embed.align=false` embeds the crops again."""
    from ers_spark.distributed.align import decode_photo
    from ers_spark.models.align import aligned_chip, centred_resize
    from ers_spark.models.spec import load_model_spec
    from ers_spark.models.preprocess import prepare_arrays

    photos = _photos()
    src = tmp_path / "photos.parquet"
    pd.DataFrame({"path": [p for p, _ in photos], "bytes": [b for _, b in photos]}).to_parquet(src)
    cfg = make_cfg(f"ingest.input_path={src}", "ingest.input_format=parquet", "ingest.path_column=path",
                   "embed.align=auto")
    run_ingest(spark, cfg)
    record = run_embed(spark, cfg)
    several = int(len(photos) == 3)  # the couple
    assert record["counts"] == {"crops": len(photos), "already_embedded": 0, "to_embed": len(photos),
                                "written": len(photos), "quarantined": 0, "aligned": len(photos) - 1,
                                "embedded_unaligned": 1, "no_face": 0, "several_faces": several}
    assert record["params"]["model_version"].endswith("+dlib_chip150p0.25") and record["params"]["align"] == "auto"
    assert spark.read.format("delta").load(table_path(cfg, CROPS)).count() == len(photos)

    params = resolve_model(cfg.embed)
    table = (spark.read.format("delta").load(table_path(cfg, EMBEDDINGS))
             .join(spark.read.format("delta").load(table_path(cfg, CROPS)), "image_id").toPandas())
    model = OnnxEmbedder(params.model_path, params.spec)
    for path, data in photos:
        row = table[table.source_path == path].iloc[0]
        rgb, _ = decode_photo(data, 150)
        chip, faces = aligned_chip(rgb, load_model_spec("dlib_resnet_v1").alignment, 150, min_side=150)
        assert bool(row.aligned) == (faces > 0), path
        chip = chip if faces else centred_resize(rgb, 150)
        direct, _ = model.embed(prepare_arrays([chip], params.spec))
        assert float(np.dot(row.embedding, direct[0])) > 0.99999, path

    assert run_embed(spark, cfg)["counts"]["to_embed"] == 0
    unaligned = run_embed(spark, make_cfg(f"storage.root={cfg.storage.root}", "embed.align=false"))
    assert unaligned["counts"]["to_embed"] == len(photos) and "+dlib" not in unaligned["params"]["model_version"]


def test_torch_backend_in_spark_matches_onnx(spark, make_cfg, demo_rows, tmp_path) -> None:
    pytest.importorskip("torch", reason="torch is optional: pip install 'ers-spark[torch]'")
    src = _write_parquet(demo_rows.iloc[:4], tmp_path / "t.parquet")
    cfg = _parquet_cfg(make_cfg, src, "embed.backend=torch")
    _ingest(spark, cfg)
    assert run_embed(spark, cfg)["counts"]["written"] == 4
    table = spark.read.format("delta").load(table_path(cfg, EMBEDDINGS)).toPandas()
    params = resolve_model(cfg.embed)
    crops = spark.read.format("delta").load(table_path(cfg, CROPS)).select("image_id", "bytes").toPandas()
    batch, _, _ = decode_batch(list(crops["bytes"]), params.spec)
    direct, _ = OnnxEmbedder(params.model_path, params.spec).embed(batch)
    by_id = dict(zip(table["image_id"], np.stack(table["embedding"].to_numpy())))
    assert min(float(np.dot(by_id[i], v)) for i, v in zip(crops["image_id"], direct)) >= 0.999


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_orl_crops() -> pd.DataFrame:
    """24 ORL faces downscaled to 24x28 px (in code) plus one flat grey image in which no face can be found."""
    from PIL import Image

    orl = shared_data_dir("orl_faces")
    pytest.importorskip("dlib", reason="alignment needs dlib (pip install dlib-bin)")
    paths = sorted(orl.glob("s*/*.pgm"), key=lambda p: (int(p.parent.name[1:]), int(p.stem)))[::17][:24]
    rows = [
        (f"orl/{p.parent.name}/{p.stem}.png", p.parent.name,
         _png_bytes(np.asarray(Image.open(p).convert("L").resize((24, 28), Image.Resampling.BILINEAR))))
        for p in paths
    ]
    rows.append(("grey/flat.png", "nobody", _png_bytes(np.full((28, 24), 128, np.uint8))))
    return pd.DataFrame(rows, columns=["path", "identity", "bytes"])


def _embedded_crops(spark, cfg) -> pd.DataFrame:
    crops = spark.read.format("delta").load(table_path(cfg, CROPS))
    emb = spark.read.format("delta").load(table_path(cfg, EMBEDDINGS))
    return crops.join(emb, "image_id").select("image_id", "source_path", "aligned").toPandas()


def test_align_keeps_24x28_crops_and_records_aligned(spark, make_cfg, tiny_orl_crops, tmp_path) -> None:
    """Small crops are enlarged before detection; where no face is found the centred resize is embedded (aligned=false)."""
    src = _write_parquet(tiny_orl_crops, tmp_path / "in.parquet")
    cfg = _parquet_cfg(make_cfg, src, "embed.align=true")
    _ingest(spark, cfg)
    record = run_embed(spark, cfg)
    table = _embedded_crops(spark, cfg)
    assert len(table) == len(tiny_orl_crops)  # none lost
    assert table.aligned.notna().all()
    assert int((~table.aligned.astype(bool)).sum()) == record["counts"]["embedded_unaligned"] >= 1  # the grey one
    assert not table[table.source_path == "grey/flat.png"].aligned.iloc[0]
    assert table.aligned.astype(bool).sum() == record["counts"]["aligned"] >= 0.8 * (len(table) - 1)  # found after enlarging
    assert record["counts"]["no_face"] == 0
    assert record["counts"]["to_embed"] == record["counts"]["written"] == len(table)


def test_no_face_policy_quarantine(spark, make_cfg, tiny_orl_crops, tmp_path) -> None:
    """embed.no_face=quarantine: a crop without a detectable face goes to quarantine as no_face, not to embeddings."""
    src = _write_parquet(tiny_orl_crops.tail(3), tmp_path / "in.parquet")
    cfg = _parquet_cfg(make_cfg, src, "embed.align=true", "embed.no_face=quarantine")
    _ingest(spark, cfg)
    record = run_embed(spark, cfg)
    quarantine = spark.read.format("delta").load(table_path(cfg, QUARANTINE)).toPandas()
    counts = record["counts"]
    assert counts["no_face"] >= 1 and counts["embedded_unaligned"] == 0
    assert counts["quarantined"] == counts["no_face"] and counts["written"] == counts["aligned"] == 3 - counts["no_face"]
    assert set(quarantine.reason) == {"no_face"} and set(quarantine.stage) == {"embed"}
    assert "grey/flat.png" in set(quarantine.source_path)
    assert set(quarantine.model_version) == {record["params"]["model_version"]}
    assert _embedded_crops(spark, cfg).aligned.astype(bool).all()


def test_old_embeddings_table_gains_the_aligned_column(spark, make_cfg) -> None:
    """A table written before ``aligned`` existed is migrated by ensure_table (null for old rows)."""
    from ers_spark.lake.tables import ensure_table

    cfg = make_cfg()
    old_schema = "image_id string, embedding array<float>, raw_norm float, model_name string, model_version string, embedded_at timestamp"
    spark.createDataFrame([("a", [1.0, 0.0], 1.0, "m", "1", datetime(2026, 1, 1))], old_schema).write.format(
        "delta").save(table_path(cfg, EMBEDDINGS))
    ensure_table(spark, cfg, EMBEDDINGS)
    rows = spark.read.format("delta").load(table_path(cfg, EMBEDDINGS)).collect()
    assert [(r.image_id, r.aligned) for r in rows] == [("a", None)]


def test_old_crops_table_keeps_its_retired_columns(spark, make_cfg) -> None:
    """A crops table from when alignment wrote chips as crops (``parent_image_id``, ``face_index``): new rows
    are inserted with those columns null, the old rows keep theirs."""
    cfg = make_cfg()
    old_schema = ("image_id string, parent_image_id string, face_index int, source_path string, identity string, "
                  "width int, height int, format string, bytes binary, ingested_at timestamp")
    now = datetime(2026, 1, 1)
    spark.createDataFrame([("chip", "photo", 0, "p.png#face0", None, 150, 150, "png", b"x", now)], old_schema).write.format(
        "delta").save(table_path(cfg, CROPS))
    new = spark.createDataFrame([("new", "n.png", "someone", 1, 1, "png", b"y", now)], CROPS.schema)
    assert merge_insert_new(spark, cfg, CROPS, new) == 1
    rows = sorted(spark.read.format("delta").load(table_path(cfg, CROPS)).select(
        "image_id", "parent_image_id", "face_index").collect())
    assert [tuple(r) for r in rows] == [("chip", "photo", 0), ("new", None, None)]
