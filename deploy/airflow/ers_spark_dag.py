"""Airflow DAG ``ers_spark``: the pipeline as one spark-submit task per stage.

    ingest -> embed -> locate_ui -> score -> clean -> maintain

``maintain`` (OPTIMIZE + VACUUM of every table, ``maintain.vacuum_retention_hours`` from the
config) runs last in the same DAG, so it never races a stage's MERGE on the same table.

Each task runs ``spark-submit jobs/<stage>.py --config CONFIG storage.root=ROOT`` (ingest adds
``ingest.input_path=INPUT``) with Delta Lake's jar on the command line (``--packages``: under
spark-submit the JVM starts before Python, so ``spark.jars.packages`` in the config is too late).

Install Airflow where the scheduler and workers run, apart from ers-spark's runtime
(``pip install -r deploy/airflow/requirements.txt``), copy or link this file into the dags
folder, and give the workers ``spark-submit`` on PATH and a Python with ers-spark installed.

Params (defaults from ERS_SPARK_* environment variables where set; override per run with
"Trigger DAG w/ config" or ``airflow dags test ers_spark DATE -c '{"input_path": ...}'``):

    project_dir   the ers-spark checkout on the worker (jobs/, conf/, dist/)
    config_path   YAML config; empty: <project_dir>/conf/local.yaml
    input_path    images folder or Parquet table for ingest
    storage_root  the Delta lake's root (storage.root)
    master        Spark master (local[2], spark://host:7077, yarn, k8s://...); empty: the
                  connection's (``spark_default``: conn_type spark, host = master,
                  extra {"deploy-mode": "client"}; without one the provider falls back to yarn)
    py_files      code zip for --py-files (``deploy/package.sh`` writes dist/ers_spark.zip),
                  relative to project_dir or absolute; empty: none (ers-spark installed on every node)
    python        PYSPARK_PYTHON for driver and executors: an interpreter with ers-spark installed

Scheduling: one run per logical date (``schedule``, ``max_active_runs=1``, no catchup); tasks
retry twice. A re-run of a date (retry, clear, backfill) is idempotent: every stage MERGEs on
``image_id``, so it changes no row that is already right.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, Param

DAG_ID = "ers_spark"
STAGES = ("ingest", "embed", "locate_ui", "score", "clean", "maintain")  # task ids = jobs/<stage>.py
# ers_spark.versions.DELTA_PACKAGE, written out: Airflow parses this file where ers-spark may not be installed
# (tests/test_versions.py fails when the two differ)
DELTA_PACKAGES = os.environ.get("ERS_SPARK_PACKAGES", "io.delta:delta-spark_4.2_2.13:4.4.0")
DEFAULT_PROJECT_DIR = os.environ.get("ERS_SPARK_PROJECT_DIR") or str(Path(__file__).resolve().parents[2])

CONFIG = "{{ params.config_path or params.project_dir ~ '/conf/local.yaml' }}"
PY_FILES = (
    "{{ '' if not params.py_files else params.py_files if params.py_files.startswith('/') or '://' in params.py_files"
    " else params.project_dir ~ '/' ~ params.py_files }}"
)
QUIET_LOG4J = "-Dlog4j2.configurationFile={{ params.project_dir }}/ers_spark/conf/log4j2-quiet.properties"


class ErsSparkSubmitOperator(SparkSubmitOperator):
    """SparkSubmitOperator whose templated ``master``, when not empty, replaces the connection's master."""

    template_fields = (*SparkSubmitOperator.template_fields, "master")

    def __init__(self, *, master: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.master = master

    def _get_hook(self):
        hook = super()._get_hook()
        master = (self.master or "").strip()
        if master:
            # the hook resolved its connection in __init__; derive what depends on the master again
            hook._connection["master"] = master
            hook._is_yarn = "yarn" in master
            hook._is_yarn_cluster_mode = hook._is_yarn and hook._connection["deploy_mode"] == "cluster"
            hook._is_kubernetes = "k8s" in master
            hook._should_track_driver_status = hook._resolve_should_track_driver_status()
        return hook


def stage_task(stage: str) -> ErsSparkSubmitOperator:
    args = ["--config", CONFIG, "storage.root={{ params.storage_root }}"]
    if stage == "ingest":
        args.append("ingest.input_path={{ params.input_path }}")
    return ErsSparkSubmitOperator(
        task_id=stage,
        application="{{ params.project_dir }}/jobs/" + stage + ".py",
        application_args=args,
        name=f"ers-spark-{stage.replace('_', '-')}",
        master="{{ params.master }}",
        packages=DELTA_PACKAGES,
        py_files=PY_FILES,
        # quiet driver logging (no Hive SerDe WARN per table); client mode: the driver runs on the worker
        conf={"spark.driver.extraJavaOptions": QUIET_LOG4J},
        env_vars={"PYSPARK_PYTHON": "{{ params.python }}"},
    )


with DAG(
    dag_id=DAG_ID,
    description="ers-spark: ingest -> embed -> locate-ui -> score -> clean -> maintain on Spark + Delta Lake",
    schedule=os.environ.get("ERS_SPARK_SCHEDULE", "@daily"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2), "retry_exponential_backoff": True},
    params={
        "project_dir": Param(DEFAULT_PROJECT_DIR, type="string", description="ers-spark checkout on the worker"),
        "config_path": Param(
            os.environ.get("ERS_SPARK_CONFIG", ""), type="string", description="YAML config; empty: conf/local.yaml"
        ),
        "input_path": Param(
            os.environ.get("ERS_SPARK_INPUT_PATH", ""), type="string", description="images folder or Parquet table"
        ),
        "storage_root": Param(
            os.environ.get("ERS_SPARK_STORAGE_ROOT", "~/.ers-spark/lake"), type="string", description="storage.root"
        ),
        "master": Param(
            os.environ.get("ERS_SPARK_MASTER", ""), type="string", description="Spark master; empty: the connection's"
        ),
        "py_files": Param(
            os.environ.get("ERS_SPARK_PY_FILES", "dist/ers_spark.zip"),
            type="string",
            description="code zip for --py-files, relative to project_dir; empty: none",
        ),
        "python": Param(
            os.environ.get("ERS_SPARK_PYTHON", "python3"), type="string", description="PYSPARK_PYTHON with ers-spark"
        ),
    },
    tags=["ers-spark"],
) as dag:
    tasks = [stage_task(stage) for stage in STAGES]
    for upstream, downstream in zip(tasks, tasks[1:]):
        upstream >> downstream
