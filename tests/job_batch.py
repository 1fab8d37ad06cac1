"""Run several ``jobs/*.py`` entry scripts inside one ``spark-submit`` (one JVM, one SparkSession).

Each script runs as ``__main__`` with its own argv, exactly as spark-submit would start it; its
exit status, its ``error:`` lines and the stage records (JSON lines) it printed are reported as one
``BATCH {json}`` line on stdout. The cluster tests use it to run many short jobs without paying a
JVM start for each.

    spark-submit ... tests/job_batch.py '[["jobs/embed.py", ["storage.root=/lake"]], ...]'
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys

from ers_spark.lake.logs import configure_logging

BATCH_PREFIX = "BATCH "


def run_one(script: str, args: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv = [script, *args]
    code: int | str | None = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code
    sys.stdout.write(stdout.getvalue())
    sys.stderr.write(stderr.getvalue())
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error: ")]
    records = [json.loads(line) for line in stdout.getvalue().splitlines() if line.startswith('{"')]
    return {"script": script, "args": args, "exit": 0 if code is None else code, "errors": errors, "records": records}


def main() -> None:
    configure_logging()  # before any redirect: log lines keep going to the real stderr
    for script, args in json.loads(sys.argv[1]):
        print(BATCH_PREFIX + json.dumps(run_one(script, args)), flush=True)


if __name__ == "__main__":
    main()
