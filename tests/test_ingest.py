"""Ingest: folders and Parquet -> crops; corrupt files -> quarantine; re-runs add nothing; bytes stay put."""

from __future__ import annotations

import hashlib
import io
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from chispa import assert_df_equality
from PIL import Image

import ers_spark.stages.ingest as ingest
from ers_spark.lake.contracts import BYTES, CROPS, QUARANTINE
from ers_spark.errors import ContractError
from ers_spark.distributed.images import probe_image
from ers_spark.stages.ingest import insert_crops, plan_ingest, run_ingest
from ers_spark.lake.tables import table_path

pytestmark = pytest.mark.spark


def _image_bytes(rng: np.random.Generator, fmt: str, size: tuple[int, int], grey: bool = False) -> bytes:
    shape = (size[1], size[0]) if grey else (size[1], size[0], 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def folder_50(tmp_path: Path) -> tuple[Path, list[dict]]:
    """50 files in 5 identity folders: 45 distinct decodable images and 5 corrupt files."""
    rng = np.random.default_rng(7)
    root = tmp_path / "faces"
    expected = []
    formats = [("jpg", "JPEG", "jpeg"), ("png", "PNG", "png"), ("pgm", "PPM", "pnm"), ("gif", "GIF", "gif"), ("webp", "WEBP", "webp")]
    for person in range(5):
        folder = root / f"person_{person}"
        folder.mkdir(parents=True)
        for k in range(9):
            ext, pil_fmt, fmt = formats[(person + k) % len(formats)]
            size = (20 + k, 30 + person)
            data = _image_bytes(rng, pil_fmt, size, grey=ext == "pgm")
            (folder / f"{k}.{ext}").write_bytes(data)
            expected.append({"source_path": f"file:{folder / f'{k}.{ext}'}", "identity": f"person_{person}",
                             "width": size[0], "height": size[1], "format": fmt})
    good_jpeg = _image_bytes(rng, "JPEG", (64, 64))
    (root / "person_0" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "person_1" / "garbage.png").write_bytes(b"this is not a png at all")
    (root / "person_2" / "empty.jpg").write_bytes(b"")
    (root / "person_3" / "html.webp").write_bytes(b"<html>404 not found</html>")
    (root / "person_4" / "header_only.gif").write_bytes(b"GIF89a\x10\x00\x10\x00")
    (root / "person_4" / "notes.txt").write_text("not an image extension: ignored")
    return root, expected


def test_probe_image_reasons() -> None:
    assert probe_image(b"") == (None, None, None, "empty_file", "file has 0 bytes")
    width, height, fmt, reason, _ = probe_image(_image_bytes(np.random.default_rng(0), "PNG", (7, 5)))
    assert (width, height, fmt, reason) == (7, 5, "png", None)
    assert probe_image(b"garbage")[3] == "undecodable"


def test_folder_with_corrupt_files(spark, make_cfg, folder_50, capsys) -> None:
    root, expected = folder_50
    cfg = make_cfg(f"ingest.input_path={root}")
    record = run_ingest(spark, cfg)
    assert record["counts"] == {"read": 50, "written": 45, "already_present": 0, "quarantined": 5, "identity_conflicts": 0, "changed_after_probe": 0}
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"stage": "ingest"' in printed and '"written": 45' in printed

    crops = spark.read.format("delta").load(table_path(cfg, CROPS))
    assert crops.count() == 45
    expected_df = spark.createDataFrame(
        pd.DataFrame(expected), "source_path string, identity string, width int, height int, format string"
    )
    actual = crops.select("source_path", "identity", "width", "height", "format")
    assert_df_equality(actual, expected_df, ignore_row_order=True, ignore_nullable=True, ignore_column_order=True)

    quarantine = spark.read.format("delta").load(table_path(cfg, QUARANTINE))
    reasons = {Path(r.source_path).name: r.reason for r in quarantine.collect()}
    assert reasons == {
        "truncated.jpg": "undecodable",
        "garbage.png": "undecodable",
        "empty.jpg": "empty_file",
        "html.webp": "undecodable",
        "header_only.gif": "undecodable",
    }
    assert all(r.detail for r in quarantine.collect())


def test_rerun_adds_nothing(spark, make_cfg, folder_50) -> None:
    root, _ = folder_50
    cfg = make_cfg(f"ingest.input_path={root}")
    run_ingest(spark, cfg)
    again = run_ingest(spark, cfg)
    assert again["counts"] == {"read": 50, "written": 0, "already_present": 45, "quarantined": 5, "identity_conflicts": 0, "changed_after_probe": 0}
    assert spark.read.format("delta").load(table_path(cfg, CROPS)).count() == 45
    assert spark.read.format("delta").load(table_path(cfg, QUARANTINE)).count() == 5


def test_same_bytes_same_id(spark, make_cfg, tmp_path: Path) -> None:
    """Same bytes under one identity: one crop, the copy is already_present."""
    data = _image_bytes(np.random.default_rng(1), "PNG", (10, 10))
    for name in ("x.png", "copy_of_x.png"):
        (tmp_path / "dup" / "alice").mkdir(parents=True, exist_ok=True)
        (tmp_path / "dup" / "alice" / name).write_bytes(data)
    cfg = make_cfg(f"ingest.input_path={tmp_path / 'dup'}")
    record = run_ingest(spark, cfg)
    assert record["counts"] == {"read": 2, "written": 1, "already_present": 1, "quarantined": 0, "identity_conflicts": 0, "changed_after_probe": 0}
    import hashlib

    (row,) = spark.read.format("delta").load(table_path(cfg, CROPS)).collect()
    assert row.image_id == hashlib.sha256(data).hexdigest()


def test_same_bytes_other_identity_is_an_identity_conflict(spark, make_cfg, tmp_path: Path) -> None:
    """Same bytes labelled a and b: one crop (the first path), the other quarantined, never hidden."""
    data = _image_bytes(np.random.default_rng(1), "PNG", (10, 10))
    for name in ("a", "b"):
        (tmp_path / "dup" / name).mkdir(parents=True)
        (tmp_path / "dup" / name / "x.png").write_bytes(data)
    cfg = make_cfg(f"ingest.input_path={tmp_path / 'dup'}")
    record = run_ingest(spark, cfg)
    assert record["counts"] == {"read": 2, "written": 1, "already_present": 0, "quarantined": 1, "identity_conflicts": 1, "changed_after_probe": 0}
    (crop,) = spark.read.format("delta").load(table_path(cfg, CROPS)).collect()
    (q,) = spark.read.format("delta").load(table_path(cfg, QUARANTINE)).collect()
    assert crop.identity == "a" and (q.reason, q.source_path.endswith("/b/x.png")) == ("identity_conflict", True)
    assert q.detail == f"same bytes as {crop.source_path} labelled a"
    # a later batch with the same bytes under a third identity conflicts with the stored crop
    (tmp_path / "later" / "c").mkdir(parents=True)
    (tmp_path / "later" / "c" / "y.png").write_bytes(data)
    later = run_ingest(spark, make_cfg(f"ingest.input_path={tmp_path / 'later'}", f"storage.root={cfg.storage.root}",
                                       f"storage.database={cfg.storage.database}"))
    assert later["counts"]["identity_conflicts"] == 1 and later["counts"]["written"] == 0


def test_identity_from_folder_can_be_off(spark, make_cfg, folder_50) -> None:
    root, _ = folder_50
    cfg = make_cfg(f"ingest.input_path={root / 'person_1'}", "ingest.identity_from_folder=false")
    run_ingest(spark, cfg)
    identities = {r.identity for r in spark.read.format("delta").load(table_path(cfg, CROPS)).collect()}
    assert identities == {None}


def test_parquet_input(spark, make_cfg, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pdf = pd.DataFrame(
        {
            "img": [_image_bytes(rng, "PNG", (12, 8)), _image_bytes(rng, "JPEG", (9, 9)), b"\x00\x01broken", None],
            "uri": ["s3://b/1.png", "s3://b/2.jpg", "s3://b/3.png", "s3://b/4.png"],
            "person": ["ann", "bob", "ann", "bob"],
        }
    )
    src = tmp_path / "in.parquet"
    pdf.to_parquet(src)
    cfg = make_cfg(
        f"ingest.input_path={src}", "ingest.input_format=parquet", "ingest.bytes_column=img",
        "ingest.path_column=uri", "ingest.identity_column=person",
    )
    record = run_ingest(spark, cfg)
    assert record["counts"] == {"read": 4, "written": 2, "already_present": 0, "quarantined": 2, "identity_conflicts": 0, "changed_after_probe": 0}
    crops = spark.read.format("delta").load(table_path(cfg, CROPS))
    expected = spark.createDataFrame([("s3://b/1.png", "ann", 12, 8), ("s3://b/2.jpg", "bob", 9, 9)],
                                     "source_path string, identity string, width int, height int")
    assert_df_equality(crops.select("source_path", "identity", "width", "height"), expected,
                       ignore_row_order=True, ignore_nullable=True)
    reasons = {r.source_path: r.reason for r in spark.read.format("delta").load(table_path(cfg, QUARANTINE)).collect()}
    assert reasons == {"s3://b/3.png": "undecodable", "s3://b/4.png": "empty_file"}


def test_parquet_schema_mismatch_names_columns(spark, make_cfg, tmp_path: Path) -> None:
    src = tmp_path / "wrong.parquet"
    pd.DataFrame({"img": ["not bytes"], "person": [1]}).to_parquet(src)
    cfg = make_cfg(
        f"ingest.input_path={src}", "ingest.input_format=parquet", "ingest.bytes_column=img",
        "ingest.path_column=uri", "ingest.identity_column=person",
    )
    with pytest.raises(ContractError) as info:
        run_ingest(spark, cfg)
    message = str(info.value)
    assert "column 'img' is string, expected binary" in message
    assert "missing column 'uri' (string)" in message
    assert "column 'person' is bigint, expected string" in message
    assert "\n" not in message


def test_pillow_decodes_each_file_once(spark, make_cfg, folder_50, monkeypatch) -> None:
    """One probe per file (the empty one is told empty without Pillow), though the probe rows feed conflicts,
    counts, quarantine and the keep-list; the crops get exactly the bytes of their files."""
    calls = spark.sparkContext.accumulator(0)
    real = ingest.probe_batch

    def counted(images: pd.Series) -> pd.DataFrame:  # hints: PySpark reads them as a pandas UDF's
        calls.add(len(images))
        return real(images)

    monkeypatch.setattr(ingest, "probe_batch", counted)
    root, _ = folder_50
    cfg = make_cfg(f"ingest.input_path={root}")
    record = run_ingest(spark, cfg)
    assert record["counts"] == {"read": 50, "written": 45, "already_present": 0, "quarantined": 5, "identity_conflicts": 0, "changed_after_probe": 0}
    assert calls.value == 50
    crops = spark.read.format("delta").load(table_path(cfg, CROPS)).select("image_id", "source_path", BYTES).collect()
    assert len(crops) == 45
    for crop in crops:
        data = Path(crop.source_path.removeprefix("file:")).read_bytes()
        assert (bytes(crop[BYTES]), crop.image_id) == (data, hashlib.sha256(data).hexdigest())


def _byte_exchanges(plan) -> list[str]:
    """Every exchange (shuffle or broadcast) of a JVM physical plan whose output has a binary column."""
    found, stack = [], [plan]
    while stack:
        node = stack.pop()
        if node.nodeName().endswith("Exchange"):
            types = [node.output().apply(i).dataType().typeName() for i in range(node.output().size())]
            if "binary" in types:
                found.append(node.toString())
        children = node.children()
        stack.extend(children.apply(i) for i in range(children.size()))
    return found


def _executed_byte_exchanges(spark, since: int) -> list[str]:
    """The exchanges that carried the bytes column in every SQL execution after ``since`` (Delta's MERGE
    jobs included), read from the plans Spark's SQL status store keeps (formatted, AQE off)."""
    spark.sparkContext._jsc.sc().listenerBus().waitUntilEmpty()
    executions = spark._jsparkSession.sharedState().statusStore().executionsList()
    found = []
    for e in (executions.apply(i) for i in range(executions.size())):
        if e.executionId() <= since:
            continue
        for section in re.split(r"\n\n(?=\(\d+\) )", e.physicalPlanDescription()):
            node = re.match(r"\((\d+)\) (\w*Exchange)\b.*\nInput \[\d+\]: \[(.*)\]", section)
            if node and re.search(rf"\b{BYTES}#", node.group(3)):
                found.append(f"execution {e.executionId()} ({e.description()[:80]}): {node.group(3)}")
    return found


def _last_execution(spark) -> int:
    executions = spark._jsparkSession.sharedState().statusStore().executionsList()
    return max((executions.apply(i).executionId() for i in range(executions.size())), default=-1)


@pytest.mark.parametrize("broadcast_keep", [True, False], ids=["small-batch", "big-batch"])
def test_image_bytes_cross_one_exchange(spark, make_cfg, folder_50, monkeypatch, broadcast_keep) -> None:
    """Probe, identity conflicts, counts and new-vs-stored run on byte-free rows; the bytes of the new rows
    cross one exchange in the whole stage. Shuffle joins as on a big crops table (no automatic broadcast);
    the keep-list is broadcast (small batch: the MERGE's anti-join is the exchange) or not (big batch: the
    join that brings the bytes back is, and the MERGE reuses its partitioning by image_id)."""
    root, _ = folder_50
    cfg = make_cfg(f"ingest.input_path={root / 'person_0'}")
    run_ingest(spark, cfg)  # crops already holds person_0: the stored side of the joins is not empty
    cfg = make_cfg(f"ingest.input_path={root}", f"storage.root={cfg.storage.root}", f"storage.database={cfg.storage.database}")
    plans = []
    real_insert = ingest.insert_crops
    monkeypatch.setattr(ingest, "broadcastable", lambda spark_, size: broadcast_keep)
    monkeypatch.setattr(ingest, "insert_crops", lambda spark_, cfg_, plan: plans.append(plan) or real_insert(spark_, cfg_, plan))
    keys = ("spark.sql.adaptive.enabled", "spark.sql.autoBroadcastJoinThreshold", "spark.sql.ui.explainMode")
    previous = {k: spark.conf.get(k) for k in keys}
    for key, value in zip(keys, ("false", "-1", "formatted")):
        spark.conf.set(key, value)
    try:
        since = _last_execution(spark)
        record = run_ingest(spark, cfg)
        executed = _executed_byte_exchanges(spark, since)
        (plan,) = plans
        in_crops = _byte_exchanges(plan.crops._jdf.queryExecution().executedPlan())
        in_others = [x for df in (plan.keep, plan.quarantine) for x in _byte_exchanges(df._jdf.queryExecution().executedPlan())]
    finally:
        for key, value in previous.items():
            spark.conf.set(key, value)
    assert record["counts"] == {"read": 50, "written": 36, "already_present": 9, "quarantined": 5, "identity_conflicts": 0, "changed_after_probe": 0}
    assert len(in_crops) == (0 if broadcast_keep else 1), in_crops
    assert in_others == []
    assert len(executed) == 1, executed


def test_crops_written_meanwhile_are_matched_not_duplicated(spark, make_cfg, folder_50, caplog) -> None:
    """Rows found new, then inserted by another ingest before this one writes: the MERGE matches them."""
    root, _ = folder_50
    cfg = make_cfg(f"ingest.input_path={root / 'person_1'}")
    plan = plan_ingest(spark, cfg)
    assert (plan.read, plan.new, plan.quarantined) == (10, 9, 1)
    other = make_cfg(f"ingest.input_path={root}", f"storage.root={cfg.storage.root}", f"storage.database={cfg.storage.database}")
    assert run_ingest(spark, other)["counts"]["written"] == 45
    with caplog.at_level(logging.WARNING, logger="ers_spark"):
        written = insert_crops(spark, cfg, plan)
    assert (written.inserted, written.matched, written.changed_after_probe) == (0, 9, 0)  # already present, counted
    assert "changed or vanished" not in caplog.text
    crops = spark.read.format("delta").load(table_path(cfg, CROPS))
    assert crops.count() == crops.select("image_id").distinct().count() == 45


def test_a_file_changed_after_its_probe_is_not_written_under_its_old_id(spark, make_cfg, folder_50, caplog) -> None:
    root, _ = folder_50
    cfg = make_cfg(f"ingest.input_path={root / 'person_2'}")
    plan = plan_ingest(spark, cfg)
    (changed,) = (root / "person_2").glob("0.*")
    changed.write_bytes(_image_bytes(np.random.default_rng(99), "PNG", (8, 8)))
    with caplog.at_level(logging.WARNING, logger="ers_spark"):
        written = insert_crops(spark, cfg, plan)
    assert (written.inserted, written.matched, written.changed_after_probe) == (8, 0, 1)  # counted, not subtracted
    assert "1 of 9 new files changed or vanished after they were probed" in caplog.text
    crops = spark.read.format("delta").load(table_path(cfg, CROPS)).collect()
    assert all(hashlib.sha256(bytes(c[BYTES])).hexdigest() == c.image_id for c in crops)
    assert not any(c.source_path.endswith(f"/person_2/{changed.name}") for c in crops)


def test_parquet_repeated_rows_give_one_crop(spark, make_cfg, tmp_path: Path) -> None:
    """A Parquet table may repeat a row or have no paths at all: rows are told apart by file and row index."""
    rng = np.random.default_rng(5)
    one, two = _image_bytes(rng, "PNG", (6, 6)), _image_bytes(rng, "PNG", (7, 7))
    pd.DataFrame({"img": [one, one, two, two, two]}).to_parquet(tmp_path / "in.parquet")
    cfg = make_cfg(f"ingest.input_path={tmp_path / 'in.parquet'}", "ingest.input_format=parquet",
                   "ingest.bytes_column=img", "ingest.path_column=null")
    record = run_ingest(spark, cfg)
    assert record["counts"] == {"read": 5, "written": 2, "already_present": 3, "quarantined": 0, "identity_conflicts": 0, "changed_after_probe": 0}
    crops = spark.read.format("delta").load(table_path(cfg, CROPS)).select("image_id", "width", "source_path").collect()
    assert sorted((c.image_id, c.width, c.source_path) for c in crops) == sorted(
        [(hashlib.sha256(one).hexdigest(), 6, None), (hashlib.sha256(two).hexdigest(), 7, None)])
