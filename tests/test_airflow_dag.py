"""The Airflow DAG (deploy/airflow/ers_spark_dag.py) with a real Airflow, run from its own virtualenv.

- The DagBag test runs in CI (.ci/run installs Airflow into a separate venv first); it skips with
  the reason when no Airflow can be found.
- The end-to-end ``airflow dags test`` is opt-in (six spark-submits, several minutes on 2 cores):
  ``python -m pytest -q -m airflow tests/test_airflow_dag.py``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from airflow_support import DAG_FILE, airflow_env, airflow_python, run_airflow_python
from ers_spark.versions import DELTA_PACKAGE

STAGE_TASKS = ["ingest", "embed", "locate_ui", "score", "clean", "maintain"]

_DAGBAG = r"""
import json, sys
import jinja2
from airflow.dag_processing.dagbag import DagBag
sys.path.insert(0, %(folder)r)
bag = DagBag(dag_folder=%(dag_file)r)
out = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": sorted(bag.dags)}
dag = bag.dags.get("ers_spark")
if dag is not None:
    import ers_spark_dag as mod
    render = lambda t, **p: jinja2.Template(t).render(params={"project_dir": "/p", **p})
    out.update(
        order=[t.task_id for t in dag.topological_sort()],
        upstream={t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks},
        operators={t.task_id: [c.__name__ for c in type(t).__mro__[:2]] for t in dag.tasks},
        retries={t.task_id: t.retries for t in dag.tasks},
        packages={t.task_id: t.packages for t in dag.tasks},
        applications={t.task_id: t.application for t in dag.tasks},
        args={t.task_id: t.application_args for t in dag.tasks},
        max_active_runs=dag.max_active_runs,
        catchup=dag.catchup,
        params=sorted(dag.params),
        py_files=[render(mod.PY_FILES, py_files=v) for v in ("dist/ers_spark.zip", "", "/abs/code.zip")],
        config=[render(mod.CONFIG, config_path=v) for v in ("", "/c.yaml")],
    )
print(json.dumps(out))
"""


def test_dag_imports_in_a_dagbag_with_the_stage_order(tmp_path: Path) -> None:
    python = airflow_python()
    code = _DAGBAG % {"folder": str(DAG_FILE.parent), "dag_file": str(DAG_FILE)}
    out = run_airflow_python(python, code, tmp_path)
    assert out["import_errors"] == {}
    assert out["dags"] == ["ers_spark"]
    assert out["order"] == STAGE_TASKS
    assert out["upstream"] == {"ingest": [], "embed": ["ingest"], "locate_ui": ["embed"], "score": ["locate_ui"],
                               "clean": ["score"], "maintain": ["clean"]}
    assert all(ops == ["ErsSparkSubmitOperator", "SparkSubmitOperator"] for ops in out["operators"].values())
    assert all(n >= 1 for n in out["retries"].values())
    assert set(out["packages"].values()) == {DELTA_PACKAGE}
    assert out["applications"]["locate_ui"] == "{{ params.project_dir }}/jobs/locate_ui.py"
    for task, args in out["args"].items():
        assert args[0] == "--config" and "storage.root={{ params.storage_root }}" in args
        assert ("ingest.input_path={{ params.input_path }}" in args) == (task == "ingest")
    assert out["max_active_runs"] == 1 and out["catchup"] is False
    assert {"project_dir", "config_path", "input_path", "storage_root", "master", "py_files", "python"} <= set(
        out["params"]
    )
    assert out["py_files"] == ["/p/dist/ers_spark.zip", "", "/abs/code.zip"]
    assert out["config"] == ["/p/conf/local.yaml", "/c.yaml"]
    for task in STAGE_TASKS:  # every task's entry script exists
        assert (DAG_FILE.parents[2] / "jobs" / f"{task}.py").is_file()


# ---------------------------------------------------------------- end to end (opt-in: -m airflow)

E2E_CONFIG = """\
spark:
  master: "local[2]"
  shuffle_partitions: 2
  driver_memory: 2g
  checkpoint_dir: {checkpoints}
  conf:
    spark.databricks.delta.snapshotPartitions: "2"
    spark.ui.enabled: "false"
ingest:
  input_format: parquet
  path_column: path
  identity_column: identity
locate_ui:
  kmeans_cells: 4
"""
VOLATILE = {"uic_id", "run_id", "params", "runtime", "bytes"}


def _opt_in(request: pytest.FixtureRequest) -> None:
    if "airflow" not in (request.config.option.markexpr or ""):
        pytest.skip("opt-in (several minutes): python -m pytest -q -m airflow tests/test_airflow_dag.py")


def _assert_same(spark, contract, got_root: Path, want_root: Path) -> None:
    """The table in ``got_root`` equals the one in ``want_root``: scalar columns with chispa (floats to 1e-6),
    vector columns with numpy; timestamps, run/UIC ids and image bytes are left out (they differ by design)."""
    from chispa import assert_approx_df_equality
    from pyspark.sql.types import ArrayType, TimestampType

    def read(root: Path):
        return spark.read.format("delta").load(str(root / contract.name))

    fields = [f for f in contract.schema.fields if f.name not in VOLATILE and not isinstance(f.dataType, TimestampType)]
    scalars = [f.name for f in fields if not isinstance(f.dataType, ArrayType)]
    vectors = [f.name for f in fields if isinstance(f.dataType, ArrayType)]
    got, want = read(got_root), read(want_root)
    assert_approx_df_equality(got.select(scalars).orderBy(*scalars), want.select(scalars).orderBy(*scalars),
                              precision=1e-6, ignore_nullable=True)
    key = [c for c in contract.key if c in scalars]
    for column in vectors:
        a = got.select(*key, column).toPandas().sort_values(key)
        b = want.select(*key, column).toPandas().sort_values(key)
        assert list(a[key].itertuples(index=False)) == list(b[key].itertuples(index=False))
        for va, vb in zip(a[column], b[column]):
            assert (va is None) == (vb is None), f"{contract.name}.{column}: null in one table only"
            if va is not None:
                np.testing.assert_allclose(np.asarray(va, float), np.asarray(vb, float), atol=1e-5,
                                           err_msg=f"{contract.name}.{column}")


@pytest.mark.airflow
@pytest.mark.spark
def test_airflow_dags_test_leaves_the_same_tables_as_ers_spark_run(tmp_path: Path, request) -> None:
    _opt_in(request)
    python = airflow_python()
    spark = request.getfixturevalue("spark")  # only once opted in: the shared JVM is not started for a skip
    from ers_spark.config import load_config
    from ers_spark.demo import write_demo_input
    from ers_spark.lake.contracts import ALL_TABLES, RUNS
    from ers_spark.pipeline import run_pipeline

    source = write_demo_input(tmp_path / "input")
    config = tmp_path / "e2e.yaml"
    config.write_text(E2E_CONFIG.format(checkpoints=tmp_path / "checkpoints"))
    home = tmp_path / "airflow"
    home.mkdir()
    env = airflow_env(home)

    def airflow(*args: str, timeout: int) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), "-m", "airflow", *args], capture_output=True, text=True, env=env,
                              cwd=home, timeout=timeout)

    migrate = airflow("db", "migrate", timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    run_conf = {"config_path": str(config), "input_path": str(source), "storage_root": str(tmp_path / "airflow_lake"),
                "master": "local[2]", "py_files": ""}
    result = airflow("dags", "test", "ers_spark", "2026-01-02", "-c", json.dumps(run_conf), timeout=1800)
    log = result.stdout + result.stderr
    (tmp_path / "dags_test.log").write_text(log)
    assert result.returncode == 0, log[-5000:]
    for task in STAGE_TASKS:
        assert f'"stage": "{task.replace("_", "-")}"' in log, f"no JSON run line of {task} in the task logs"

    # the reference: `ers-spark run` on the same input and config (in this process's shared session)
    reference = load_config(config, [f"storage.root={tmp_path / 'run_lake'}", f"ingest.input_path={source}",
                                     "storage.database=ers_airflow_reference"])
    records = run_pipeline(reference)
    assert [r["stage"] for r in records] == ["ingest", "embed", "locate-ui", "score", "clean"]

    for contract in ALL_TABLES.values():
        if contract.name == RUNS.name:
            continue
        _assert_same(spark, contract, tmp_path / "airflow_lake", tmp_path / "run_lake")

    def stage_counts(root: Path) -> list:  # maintain (the DAG's last task) changes files, not rows
        runs = spark.read.format("delta").load(str(root / RUNS.name)).where("stage != 'maintain'")
        return sorted((r["stage"], sorted(r["counts"].items())) for r in runs.select("stage", "counts").collect())

    assert stage_counts(tmp_path / "airflow_lake") == stage_counts(tmp_path / "run_lake")
