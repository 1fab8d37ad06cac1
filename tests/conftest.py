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


JVM_FIXTURES = frozenset({"spark", "demo_lake", "demo_first_run"})


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


# What the demo run of the tests sets besides a newcomer's defaults: its own catalog database (the workers'
# metastores hold other tests' databases) and the multi-host tests' settings (four k-means cells, two shuffle
# partitions), so that their stage scripts on the hosts can be compared with this lake row for row.
DEMO_TEST_SETTINGS = ("storage.database=ers_demo_test", "spark.shuffle_partitions=2", "locate_ui.kmeans_cells=4")


def machine_cache_overrides() -> list[str]:
    """The machine's model cache and Ivy cache for a process with another HOME (nothing is downloaded twice);
    ``spark.conf`` is the defaults plus Ivy (an override replaces the whole mapping)."""
    conf = {**load_config().spark.conf, "spark.jars.ivy": str(Path.home() / ".ivy2.5.2")}
    return [f"embed.model_cache_dir={Path.home() / '.cache' / 'ers-spark' / 'models'}", f"spark.conf={json.dumps(conf)}"]


@pytest.fixture(scope="session")
def demo_first_run(tmp_path_factory, worker_id) -> dict:
    """`ers-spark demo` run once per test run as a newcomer runs it: a fresh process and home (the machine's
    caches and :data:`DEMO_TEST_SETTINGS` added). Returns its ``home``, ``stdout``, ``stderr``, the pipeline's
    run ``records`` and the ``report`` record, parsed from its stdout.

    Under pytest-xdist the first worker that needs it runs it under a file lock in the run's common temp
    folder and leaves its output there; the others read that.
    """
    folder = (tmp_path_factory.mktemp("demo") if worker_id == "master"
              else tmp_path_factory.getbasetemp().parent / "demo-first-run")
    folder.mkdir(exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "demo.rc").is_file():
            _run_first_demo(folder)
    rc = int((folder / "demo.rc").read_text())
    stdout, stderr = (folder / "demo.stdout").read_text(), (folder / "demo.stderr").read_text()
    if rc != 0:
        raise RuntimeError(f"`ers-spark demo` exited {rc}: {stderr[-3000:]}")
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {"home": folder / "home", "stdout": stdout, "stderr": stderr,
            "records": [r for r in lines if r.get("stage") != "report"],
            "report": next(r for r in lines if r.get("stage") == "report")}


def _run_first_demo(folder: Path) -> None:
    import subprocess
    import sys

    (folder / "cwd").mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "ers_spark.cli", "demo", *machine_cache_overrides(), *DEMO_TEST_SETTINGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=folder / "cwd",
                          env={**os.environ, "HOME": str(folder / "home")})
    (folder / "demo.stdout").write_text(proc.stdout)
    (folder / "demo.stderr").write_text(proc.stderr)
    (folder / "demo.rc").write_text(str(proc.returncode))


@pytest.fixture(scope="session")
def demo_lake(spark, demo_first_run):
    """The demo's lake (every stage run once on the demo input by :func:`demo_first_run`); returns (cfg, records).

    The pipeline, report and multi-host modules share it; each worker registers its tables in its own
    catalog (each worker has its own metastore).
    """
    from ers_spark.lake.contracts import ALL_TABLES
    from ers_spark.lake.tables import register_table, table_exists

    cfg = _demo_cfg(demo_first_run["home"] / ".ers-spark" / "demo")
    for contract in ALL_TABLES.values():
        if table_exists(spark, cfg, contract):
            register_table(spark, cfg, contract)
    return cfg, demo_first_run["records"]


def _demo_cfg(folder: Path) -> ErsConfig:
    """The demo's own settings for its folder (what `ers-spark demo` ran with), and the tests' additions."""
    from ers_spark.demo import demo_settings

    return load_config(overrides=[*demo_settings(folder), *DEMO_TEST_SETTINGS])


@pytest.fixture
def make_cfg(tmp_path: Path):
    """Build a config whose tables live in this test's own folder and catalog database.

    Crops are embedded as they are (``embed.align=false``): the stage tests' inputs are synthetic images,
    24 px crops and the demo's non-faces, whose pinned figures were made that way, and dlib's detector costs
    about 15 ms a crop on this machine. Alignment, the default, has its own tests (``embed.align=auto``
    there) and the demo run (``demo_first_run``) runs every default.
    """

    def _make(*overrides: str) -> ErsConfig:
        database = f"ers_t{os.getpid()}_{next(_db_counter)}"
        base = [
            f"storage.root={tmp_path / 'lake'}",
            f"storage.database={database}",
            "spark.shuffle_partitions=2",
            f"spark.checkpoint_dir={tmp_path / 'checkpoints'}",
            "embed.align=false",
        ]
        return load_config(overrides=base + list(overrides))

    return _make
