"""Run several ``jobs/*.py`` entry scripts inside one ``spark-submit`` (one JVM, one SparkSession).

Each script runs as ``__main__`` with its own argv, exactly as spark-submit would start it; its
exit status, its ``error:`` lines and the stage records (JSON lines) it printed are reported as one
``BATCH {json}`` line on stdout. The cluster tests use it to run many short jobs without paying a
JVM start (driver and executors) for each.

A step is a dict: ``{"script": path, "args": [...]}`` runs a job script; optional ``"conf"`` sets
runtime SQL settings for that step only; ``{"wait_for": path}`` waits (bounded) until another
process creates that file; ``{"probe": root, "tables": [...]}`` counts the rows of Delta tables.

    spark-submit ... tests/job_batch.py '[{"script": "jobs/embed.py", "args": ["storage.root=/lake"]}, ...]'
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
import time
from pathlib import Path

from ers_spark.runtime.logs import configure_logging

BATCH_PREFIX = "BATCH "
WAIT_LIMIT_S = 1800.0  # a guard against a partner process that never finishes, not a speed check


def run_one(script: str, args: list[str], conf: dict[str, str] | None = None) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv = [script, *args]
    code: int | str | None = 0
    with _runtime_conf(conf or {}), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code
    sys.stdout.write(stdout.getvalue())
    sys.stderr.write(stderr.getvalue())
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error: ")]
    records = [json.loads(line) for line in stdout.getvalue().splitlines() if line.startswith('{"')]
    return {"script": script, "args": args, "exit": 0 if code is None else code, "errors": errors, "records": records}


@contextlib.contextmanager
def _runtime_conf(conf: dict[str, str]):
    """Set runtime SQL settings for one step and put the previous values back after it."""
    if not conf:
        yield
        return
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
    previous = {key: spark.conf.get(key, None) for key in conf}
    for key, value in conf.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            spark.conf.unset(key) if value is None else spark.conf.set(key, value)


def wait_for(path: str) -> dict:
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not Path(path).exists():
        if time.monotonic() > deadline:
            return {"wait_for": path, "exit": 1, "errors": [f"error: {path} did not appear"]}
        time.sleep(0.2)
    return {"wait_for": path, "exit": 0}


def probe(root: str, tables: list[str]) -> dict:
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
    counts = {t: spark.read.format("delta").load(f"{root.rstrip('/')}/{t}").count() for t in tables}
    return {"probe": root, "exit": 0, "counts": counts}


def run_step(step: dict) -> dict:
    """One step's result, with the seconds it took (the cluster tests' cost stays visible per step)."""
    started = time.monotonic()
    if "wait_for" in step:
        result = wait_for(step["wait_for"])
    elif "probe" in step:
        result = probe(step["probe"], step["tables"])
    else:
        result = run_one(step["script"], step["args"], step.get("conf"))
    return {**result, "step_seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    configure_logging()  # before any redirect: log lines keep going to the real stderr
    for step in json.loads(sys.argv[1]):
        print(BATCH_PREFIX + json.dumps(run_step(step)), flush=True)


if __name__ == "__main__":
    main()
