"""The input folder listed and read on the executors: the same files as a walk of the folder, on a local disk
and on a real S3 server (versitygw on loopback), and no list of the files on the driver."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from ers_spark.distributed.listing import StoreSettings, list_files, open_store, read_files
from ers_spark.errors import ConfigError, storage_error_from_job
from ers_spark.stages.ingest import read_source
from multi_host import ACCESS_KEY, SECRET_KEY, VERSITYGW, VERSITYGW_MODULE, _answers, wait_until

SUFFIXES = ("jpg", "png")


def _tree(root: Path) -> None:
    """Nested folders, hidden names, other extensions, upper-case ones and an empty file."""
    files = {"a/1.jpg": b"one", "a/2.PNG": b"two!", "a/b/3.jpg": b"", "a/b/c/4.png": b"4444",
             "top.jpg": b"t", "a/notes.txt": b"x", "a/.hidden.jpg": b"h", "_tmp/5.jpg": b"5", "a/_SUCCESS": b""}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def _walk(root: Path, recursive: bool) -> set[tuple[str, int]]:
    """The files the listing must find: a plain walk with Spark's rules (hidden names skipped)."""
    found = set()
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))] if recursive else []
        for name in names:
            if not name.startswith((".", "_")) and name.rsplit(".", 1)[-1].lower() in SUFFIXES:
                path = Path(folder) / name
                found.add(("file:" + str(path), path.stat().st_size))
    return found


@pytest.mark.parametrize("recursive", [True, False])
def test_listing_finds_the_files_a_walk_finds(spark, tmp_path, recursive) -> None:
    _tree(tmp_path / "in")
    got = {(r.path, r.length) for r in list_files(spark, str(tmp_path / "in"), SUFFIXES, recursive).collect()}
    assert got == _walk(tmp_path / "in", recursive)
    assert ("file:" + str(tmp_path / "in" / "a" / "b" / "3.jpg"), 0) in got or not recursive  # empty files listed


def test_a_file_as_the_input_and_file_uris(spark, tmp_path) -> None:
    _tree(tmp_path / "in")
    one = tmp_path / "in" / "top.jpg"
    for root in (str(one), "file://" + str(one), "file:" + str(one)):
        assert [(r.path, r.length) for r in list_files(spark, root, SUFFIXES, True).collect()] == [("file:" + str(one), 1)]


def test_the_bytes_read_are_the_files_bytes(spark, tmp_path) -> None:
    _tree(tmp_path / "in")
    files = list_files(spark, str(tmp_path / "in"), SUFFIXES, True)
    read = {r.path: bytes(r.content) for r in read_files(files, StoreSettings(), 3).collect()}
    assert read == {p: Path(p.removeprefix("file:")).read_bytes() for p, _ in _walk(tmp_path / "in", True)}


def test_ingest_reads_no_file_through_the_drivers_index(spark, make_cfg, tmp_path) -> None:
    """The images reach ingest from the executors' listing: Spark's file index (the driver's list of every
    input path, what ``inputFiles`` returns) holds none of them, and no plan scans the folder."""
    _tree(tmp_path / "in")
    source = read_source(spark, make_cfg(f"ingest.input_path={tmp_path / 'in'}").ingest)
    assert source.inputFiles() == []
    plan = source._jdf.queryExecution().executedPlan().toString()
    assert "FileScan" not in plan and "BinaryFile" not in plan
    assert source.count() == len(_walk(tmp_path / "in", True))


def test_a_missing_input_and_an_unknown_scheme_fail_in_one_line(spark, tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        list_files(spark, "nosuch://bucket/x", SUFFIXES, True)
    assert str(err.value).startswith("ingest.input_path nosuch://bucket/x: the executors cannot open nosuch:// paths")
    with pytest.raises(Exception) as err:
        list_files(spark, str(tmp_path / "absent"), SUFFIXES, True)
    assert str(storage_error_from_job(err.value)).startswith(
        f"a file vanished while the job read it (No such file or directory: {tmp_path / 'absent'})")


def test_a_file_deleted_after_the_listing_stops_the_read_naming_it(spark, tmp_path) -> None:
    _tree(tmp_path / "in")
    files = list_files(spark, str(tmp_path / "in"), SUFFIXES, True)
    (tmp_path / "in" / "a" / "1.jpg").unlink()
    with pytest.raises(Exception) as err:
        read_files(files, StoreSettings(), 2).collect()
    assert str(storage_error_from_job(err.value)).startswith(
        f"a file vanished while the job read it (No such file: file:{tmp_path / 'in' / 'a' / '1.jpg'})")


def test_store_settings_come_from_the_sessions_s3a_settings(spark) -> None:
    keys = {"spark.hadoop.fs.s3a.endpoint": "http://127.0.0.1:9", "spark.hadoop.fs.s3a.access.key": "k"}
    try:
        for key, value in keys.items():
            spark.conf.set(key, value)
        settings = StoreSettings.from_session(spark)
    finally:
        for key in keys:
            spark.conf.unset(key)
    assert settings.s3_arguments() == {"endpoint_override": "127.0.0.1:9", "scheme": "http", "access_key": "k"}
    assert StoreSettings.from_session(spark) == StoreSettings()


# ----------------------------------------------------------------------------- a real S3 server


@pytest.fixture
def s3_store(tmp_path):
    """versitygw on a free loopback port over a folder (a sub-folder is a bucket); stopped by its pid."""
    if not VERSITYGW.is_file():
        pytest.skip(f"the object store binary {VERSITYGW} is missing: .ci/run builds it "
                    f"(GOBIN={VERSITYGW.parent} go install {VERSITYGW_MODULE})")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = tmp_path / "store"
    (data / "faces").mkdir(parents=True)
    with open(tmp_path / "store.log", "ab") as log:
        proc = subprocess.Popen([str(VERSITYGW), "-a", ACCESS_KEY, "-s", SECRET_KEY, "-p", f"127.0.0.1:{port}",
                                 "posix", str(data)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until("versitygw on loopback", lambda: _answers(f"http://127.0.0.1:{port}"), 60)
        yield data / "faces", StoreSettings(s3=(("access_key", ACCESS_KEY), ("endpoint_override", f"http://127.0.0.1:{port}"),
                                                ("region", "us-east-1"), ("secret_key", SECRET_KEY)))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def test_listing_and_reading_an_s3a_folder_on_a_real_store(spark, s3_store) -> None:
    folder, settings = s3_store
    _tree(folder / "in")
    files = list_files(spark, "s3a://faces/in", SUFFIXES, True, settings)
    local = {(p.replace("file:" + str(folder), "s3a://faces"), n) for p, n in _walk(folder / "in", True)}
    assert {(r.path, r.length) for r in files.collect()} == local
    read = {r.path: bytes(r.content) for r in read_files(files, settings, 2).collect()}
    assert read == {p: (folder / p.removeprefix("s3a://faces/")).read_bytes() for p, _ in local}


def test_open_store_maps_uris_back_as_spark_writes_them() -> None:
    fs, path, to_uri = open_store("s3a://bucket/a/b/", StoreSettings())
    assert (path, to_uri("bucket/a/b/x.jpg")) == ("bucket/a/b", "s3a://bucket/a/b/x.jpg")
    _, path, to_uri = open_store("file:///tmp/x/../y", StoreSettings())
    assert (path, to_uri(path)) == ("/tmp/y", "file:/tmp/y")
