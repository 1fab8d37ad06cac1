"""Run Airflow code from the tests without Airflow in the test's own environment.

Airflow lives in a separate virtualenv (``.venv-airflow/``, made by ``.ci/run`` from
``deploy/airflow/requirements.txt``): its provider brings ``pyspark-client``, which installs into the
same ``pyspark/`` folder as pyspark, so it never goes into ers-spark's environment. The tests run
Airflow in subprocesses of that venv's Python; ``spark-submit`` and ``PYSPARK_PYTHON`` come from
this environment (the one with ers-spark and pyspark installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "deploy" / "airflow" / "ers_spark_dag.py"
REQUIREMENTS = REPO / "deploy" / "airflow" / "requirements.txt"
VENV = REPO / ".venv-airflow"
INSTALL_HINT = (
    f"python -m venv {VENV.name} && {VENV.name}/bin/pip install -r deploy/airflow/requirements.txt "
    "(what .ci/run does), or ERS_AIRFLOW_PYTHON=/path/to/python with Airflow"
)
_PROBE = "import airflow.providers.apache.spark.operators.spark_submit, airflow.sdk"


def airflow_python() -> Path:
    """A Python that imports Airflow and the Spark provider, or skip the test with the reason."""
    candidates = [os.environ.get("ERS_AIRFLOW_PYTHON"), VENV / "bin" / "python"]
    tried = []
    for candidate in filter(None, candidates):
        python = Path(candidate)
        if not python.exists():
            tried.append(f"{python} (absent)")
            continue
        probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120,
                               env=airflow_env(Path("/nonexistent")))
        if probe.returncode == 0:
            return python
        tried.append(f"{python} ({(probe.stderr.strip().splitlines() or ['import failed'])[-1]})")
    pytest.skip(f"Airflow with apache-airflow-providers-apache-spark not found ({'; '.join(tried)}): {INSTALL_HINT}")


def airflow_env(home: Path, master: str = "local[2]") -> dict[str, str]:
    """Environment for an Airflow subprocess: its own AIRFLOW_HOME, this repo's DAG, a local Spark connection."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(DAG_FILE.parent),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW_CONN_SPARK_DEFAULT=json.dumps(
            {"conn_type": "spark", "host": master, "extra": {"deploy-mode": "client"}}
        ),
        # spark-submit and PYSPARK_PYTHON from this environment, where pyspark and ers-spark are installed
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        ERS_SPARK_PYTHON=sys.executable,
        ERS_SPARK_PROJECT_DIR=str(REPO),
    )
    return env


def run_airflow_python(python: Path, code: str, home: Path, timeout: int = 300) -> dict:
    """Run ``code`` (which prints one JSON object last) with the Airflow Python and return that object."""
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=timeout,
                            env=airflow_env(home), cwd=home)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
