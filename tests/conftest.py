"""Shared fixtures: one SparkSession (one JVM) for the whole test run, a fresh lake per test."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
from pathlib import Path

import pytest

from ers_spark.config import ErsConfig, load_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
_db_counter = itertools.count()
DEMO_INPUT = "demo_images.parquet"


JVM_FIXTURES = frozenset({"spark", "demo_lake"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that gets the JVM through a fixture carries the `spark` marker (`-m "not spark"` skips the JVM).

    The suite runs on two pytest-xdist workers with ``--dist loadfile``: a test module stays on one
    worker, so its module fixtures (the standalone cluster among them) are built once. The modules
    are then put in the order :data:`HEAVY_FIRST` gives.
    """
    for item in items:
        if JVM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.spark)
    items.sort(key=_heavy_first)


# Modules by measured run time, longest first. With ``--dist loadfile --no-loadscope-reorder``
# pytest-xdist hands out modules in collection order (longest-first balances the two workers' ends).
HEAVY_FIRST = ("test_embed.py", "test_score_clean.py", "test_import_embeddings.py", "test_locate_ui.py",
               "test_operable_output.py", "test_ingest.py", "test_evaluate.py",
               "test_report.py", "test_maintain.py", "test_report_browser.py", "test_pipeline.py", "test_merge.py")


def _heavy_first(item: pytest.Item) -> int:
    name = item.path.name
    return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)


def shared_data_dir(name: str) -> Path:
    """A folder of ../shared/data, or skip the test with the reason."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"shared data {folder} is absent (real-face tests need ../shared/data next to the repo)")
    return folder


def _extra_jars_override() -> list[str]:
    """ERS_TEST_EXTRA_JARS=/a.jar,/b.jar adds local jars (e.g. a GraphFrames build) to the test session."""
    jars = os.environ.get("ERS_TEST_EXTRA_JARS", "").strip()
    return [f"spark.conf={{spark.jars: '{jars}'}}"] if jars else []


@pytest.fixture(scope="session")
def spark_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spark")


@pytest.fixture(scope="session")
def spark(spark_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """The one SparkSession of the test run, built by the project's own session factory.

    The xdist workers start their JVMs one at a time (a file lock in the run's common temp folder):
    on a fresh machine the first resolves ``spark.jars.packages`` into the empty Ivy cache, and two
    JVMs resolving into it at once fail to start (``JAVA_GATEWAY_EXITED``).
    """
    from ers_spark.runtime.session import build_session

    cfg = load_config(
        overrides=[
            f"storage.root={spark_root / 'lake'}",
            "spark.master=local[2]",
            "spark.shuffle_partitions=2",
            f"spark.checkpoint_dir={spark_root / 'checkpoints'}",
            "spark.driver_memory=2g",
            "spark.packages=[delta, s3a]",  # S3A too: the multi-host tests read their object store from here
            *_extra_jars_override(),
        ]
    )
    with open(tmp_path_factory.getbasetemp().parent / "spark-start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        session = build_session(cfg, "tests")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def demo_lake(spark, tmp_path_factory, worker_id):
    """The demo input run through every stage once per test run (local[2]); returns (cfg, records).

    The pipeline, report and cluster modules share it. Under pytest-xdist the first worker that needs
    it builds it under a file lock in the run's common temp folder; the others wait, read the same
    Delta tables and register them in their own catalog (each worker has its own metastore).
    """
    from ers_spark.lake.contracts import ALL_TABLES
    from ers_spark.lake.tables import register_table, table_exists

    if worker_id == "master":
        return _build_demo_lake(tmp_path_factory.mktemp("demo"))
    folder = tmp_path_factory.getbasetemp().parent / "demo-lake"
    folder.mkdir(exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = folder / "records.json"
        if not done.is_file():
            cfg, records = _build_demo_lake(folder)
            done.write_text(json.dumps(records, default=str))
            return cfg, records
    cfg = _demo_cfg(folder)
    for contract in ALL_TABLES.values():
        if table_exists(spark, cfg, contract):
            register_table(spark, cfg, contract)
    return cfg, json.loads(done.read_text())


def _demo_cfg(folder: Path) -> ErsConfig:
    return load_config(overrides=[
        f"storage.root={folder / 'lake'}", "storage.database=ers_demo_test", "spark.shuffle_partitions=2",
        f"spark.checkpoint_dir={folder / 'ckpt'}", f"ingest.input_path={folder / 'input' / DEMO_INPUT}", "ingest.input_format=parquet",
        "ingest.path_column=path", "ingest.identity_column=identity", "locate_ui.kmeans_cells=4",
    ])


def _build_demo_lake(folder: Path) -> tuple[ErsConfig, list[dict]]:
    from ers_spark.demo import write_demo_input
    from ers_spark.pipeline import run_pipeline

    assert write_demo_input(folder / "input").name == DEMO_INPUT
    cfg = _demo_cfg(folder)
    return cfg, run_pipeline(cfg)


@pytest.fixture
def make_cfg(tmp_path: Path):
    """Build a config whose tables live in this test's own folder and catalog database."""

    def _make(*overrides: str) -> ErsConfig:
        database = f"ers_t{os.getpid()}_{next(_db_counter)}"
        base = [
            f"storage.root={tmp_path / 'lake'}",
            f"storage.database={database}",
            "spark.shuffle_partitions=2",
            f"spark.checkpoint_dir={tmp_path / 'checkpoints'}",
        ]
        return load_config(overrides=base + list(overrides))

    return _make
