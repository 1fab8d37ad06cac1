"""Shared fixtures: one SparkSession (one JVM) for the whole test run, a fresh lake per test."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from ers_spark.config import ErsConfig, load_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
_db_counter = itertools.count()


JVM_FIXTURES = frozenset({"spark", "demo_lake"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that gets the JVM through a fixture carries the `spark` marker (`-m "not spark"` skips the JVM).

    The suite runs on two pytest-xdist workers with ``--dist loadfile``: a test module stays on one
    worker, so its module fixtures (the standalone cluster among them) are built once.
    """
    for item in items:
        if JVM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.spark)


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
def spark(spark_root: Path):
    """The one SparkSession of the test run, built by the project's own session factory."""
    from ers_spark.lake.session import build_session

    cfg = load_config(
        overrides=[
            f"storage.root={spark_root / 'lake'}",
            "spark.master=local[2]",
            "spark.shuffle_partitions=2",
            f"spark.checkpoint_dir={spark_root / 'checkpoints'}",
            "spark.driver_memory=2g",
            *_extra_jars_override(),
        ]
    )
    session = build_session(cfg, "tests")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def demo_lake(spark, tmp_path_factory):
    """The demo input run through every stage once in the test session (local[2]).

    Session-scoped: the pipeline tests and the cluster tests (its local[2] reference) share it.
    """
    from ers_spark.demo import write_demo_input
    from ers_spark.pipeline import run_pipeline

    folder = tmp_path_factory.mktemp("demo")
    src = write_demo_input(folder / "input")
    cfg = load_config(overrides=[
        f"storage.root={folder / 'lake'}", "storage.database=ers_demo_test", "spark.shuffle_partitions=2",
        f"spark.checkpoint_dir={folder / 'ckpt'}", f"ingest.input_path={src}", "ingest.input_format=parquet",
        "ingest.path_column=path", "ingest.identity_column=identity", "locate_ui.kmeans_cells=4",
    ])
    records = run_pipeline(cfg)
    return cfg, records


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
