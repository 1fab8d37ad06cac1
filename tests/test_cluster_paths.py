"""Paths a remote cluster cannot share stop the run before any Spark work, in one line, with exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ers_spark.config import load_config
from ers_spark.errors import ConfigError
from ers_spark.runtime.cluster_paths import report_target, require_shared_paths, stage_paths

REPO = Path(__file__).resolve().parents[1]
# never contacted: the check runs before any SparkContext exists (port 9 is discard, on loopback)
REMOTE = "spark://127.0.0.1:9"
STORE = ["storage.root=s3a://lake-bucket/ers", "spark.checkpoint_dir=s3a://lake-bucket/ckpt"]


def _cfg(*overrides: str):
    return load_config(overrides=list(overrides))


@pytest.mark.parametrize(("stage", "overrides", "key"), [
    ("embed", ["storage.root=/data/lake"], "storage.root"),
    ("embed", ["storage.root=file:///data/lake"], "storage.root"),
    ("score", ["storage.root=s3a://b/lake", "storage.warehouse_dir=/data/wh"], "storage.warehouse_dir"),
    ("embed", ["storage.root=s3a://b/lake"], "spark.checkpoint_dir"),  # the default is under ~
    ("ingest", [*STORE, "ingest.input_path=/data/faces"], "ingest.input_path"),
    ("import-embeddings", [*STORE, "import_embeddings.input_path=file:/x.parquet"], "import_embeddings.input_path"),
    ("evaluate", [*STORE, "evaluate.pairs_path=pairs.csv"], "evaluate.pairs_path"),
])
def test_a_local_path_on_a_remote_master_names_its_key(stage: str, overrides: list[str], key: str) -> None:
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError, match=rf"^{key}=\S+ is a local path, but spark.master={REMOTE} runs executors"):
        require_shared_paths(cfg, REMOTE, stage_paths(cfg, stage))


@pytest.mark.parametrize("master", ["local[2]", "local[*]", "local", None])
def test_local_mode_takes_any_path(master: str | None) -> None:
    cfg = _cfg("storage.root=/data/lake", "ingest.input_path=/data/faces")
    require_shared_paths(cfg, master, stage_paths(cfg, "ingest"))


@pytest.mark.parametrize("stage", ["ingest", "embed", "evaluate", "import-embeddings"])
def test_store_and_hdfs_paths_pass_on_a_remote_master(stage: str) -> None:
    cfg = _cfg("storage.root=hdfs://nn:8020/ers", "spark.checkpoint_dir=s3a://b/ckpt", "ingest.input_path=s3a://b/in",
               "import_embeddings.input_path=gs://b/emb", "evaluate.pairs_path=abfss://c@a.dfs.core.windows.net/p.csv")
    require_shared_paths(cfg, "yarn", stage_paths(cfg, stage))


def test_a_shared_mount_is_declared_not_guessed() -> None:
    cfg = _cfg("storage.root=/nfs/lake", "spark.checkpoint_dir=/nfs/ckpt", "spark.shared_filesystem=true")
    require_shared_paths(cfg, "k8s://https://api:6443", stage_paths(cfg, "embed"))


def test_the_report_goes_to_the_store_or_to_a_driver_file_named_as_such() -> None:
    assert report_target(_cfg(*STORE), REMOTE) == "s3a://lake-bucket/ers/report.html"
    assert report_target(_cfg(*STORE, "report.path=file:///srv/r.html"), REMOTE) == "/srv/r.html"
    with pytest.raises(ConfigError, match=r"^report.path=./r.html is a local path.*report.path=file:///path/report.html$"):
        report_target(_cfg(*STORE, "report.path=./r.html"), REMOTE)
    assert report_target(_cfg("storage.root=/data/lake", "report.path=./r.html"), "local[2]").endswith("/r.html")


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def test_the_cli_stops_before_spark_starts(tmp_path: Path) -> None:
    """`ers-spark run` against a remote master with a local lake: exit 2, one line, and nothing written."""
    lake = tmp_path / "lake"
    proc = _run([sys.executable, "-m", "ers_spark.cli", "run", f"spark.master={REMOTE}", f"storage.root={lake}",
                 f"ingest.input_path={tmp_path}"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: storage.root={lake} is a local path, but spark.master={REMOTE} runs executors on other hosts that "
        "cannot see the driver's disk: use an object store or HDFS URI (storage.root=s3a://bucket/...), or set "
        "spark.shared_filesystem=true if this path is the same shared mount on every host"]
    assert not lake.exists()


@pytest.mark.spark
def test_spark_submit_master_is_checked_before_the_context(tmp_path: Path) -> None:
    """Under spark-submit the master is spark-submit's --master (the config's is ignored): checked before
    the SparkContext registers with it, so the unreachable master is never contacted."""
    spark_submit = Path(sys.executable).with_name("spark-submit")
    proc = _run([str(spark_submit), "--master", REMOTE, str(REPO / "jobs" / "ingest.py"), *STORE,
                 f"ingest.input_path={tmp_path}", "spark.master=local[2]"], PYSPARK_PYTHON=sys.executable)
    assert proc.returncode == 2, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr  # spark-submit merges the Python driver's stderr into its stdout
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: ingest.input_path={tmp_path} is a local path, but spark.master={REMOTE} runs executors on "
                      "other hosts that cannot see the driver's disk: use an object store or HDFS URI "
                      "(ingest.input_path=s3a://bucket/...), or set spark.shared_filesystem=true if this path is the "
                      "same shared mount on every host"]
    assert "Traceback" not in output and "Py4J" not in output


@pytest.mark.spark
def test_a_log_store_missing_from_the_classpath_stops_in_one_line(spark) -> None:
    """A config that names a Delta LogStore the JVM cannot load fails at the session, not at the first commit."""
    from ers_spark.errors import ErsUserError
    from ers_spark.runtime.session import require_log_stores

    missing = _cfg("spark.conf={spark.delta.logStore.s3a.impl: io.ersspark.delta.NoSuchLogStore}")
    with pytest.raises(ErsUserError, match=r"^spark\.delta\.logStore\.s3a\.impl=io\.ersspark\.delta\.NoSuchLogStore is not "
                                           r"on the classpath: fill a jars folder with deploy/fetch_jars\.sh"):
        require_log_stores(spark._jvm, missing)
    require_log_stores(spark._jvm, _cfg("spark.conf={spark.delta.logStore.s3a.impl: io.delta.storage.S3SingleDriverLogStore}"))
