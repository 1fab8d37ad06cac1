"""``ers-spark`` command line: one sub-command per stage, plus ``run``, ``demo``, ``sql``, ``report`` and ``maintain``.

Usage: ``ers-spark STAGE [--config conf.yaml] [section.key=value ...]``. The
spark-submit scripts in ``jobs/`` call :func:`main` with their stage name.
A user-fixable problem prints ``error: <one line>`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from typing import Sequence

from ers_spark.config import load_config
from ers_spark.errors import ErsUserError, storage_error_from_job, user_error_from_executor
from ers_spark.pipeline import STAGES, run_pipeline, run_stage

COMMANDS = STAGES + ("import-embeddings", "evaluate", "maintain", "run", "demo", "sql", "report")


def check_java() -> None:
    """Spark needs Java 17+; say so in one line instead of a gateway traceback."""
    java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else shutil.which("java")
    if not java or not os.path.exists(java):
        raise ErsUserError("Java 17+ not found: install a JDK 17 or newer (e.g. apt-get install openjdk-17-jre) or set JAVA_HOME")
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if match:
        major = int(match.group(1))
        if major == 1 and match.group(2):
            major = int(match.group(2))
        if major < 17:
            raise ErsUserError(f"Java {major} found at {java}; Spark 4 needs Java 17 or newer (set JAVA_HOME)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ers-spark",
        description="Embedding recognizability scores (ERS) for face crops on Spark + Delta Lake.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "ingest": "images or Parquet -> crops table",
        "embed": "crops -> embeddings table (ONNX Runtime / torch, GPU when Spark gives one)",
        "locate-ui": "embeddings -> ui_centroids, ui_members (unrecognizable-identity cluster)",
        "score": "embeddings + UIC -> scores (ERS per image, calibrated gamma)",
        "clean": "scores -> cleaned and quarantine tables",
        "import-embeddings": "your own vectors (Parquet/Delta: id, vector[, identity, path]) -> embeddings, "
                             "imported_sources (instead of ingest + embed)",
        "maintain": "OPTIMIZE (clustering by image_id) + VACUUM every table, catalog kept in sync",
        "evaluate": "embeddings + scores + identities (or a pairs file) -> eval_runs, eval_metrics, eval_curves",
        "run": "the whole pipeline: ingest -> embed -> locate-ui -> score -> clean",
        "demo": "build a demo dataset from images an installed package ships and run the pipeline",
        "sql": "run a SQL query on the ers database and print the result",
        "report": "write one self-contained HTML page over the tables (report.path; default <storage.root>/report.html)",
    }
    for name in COMMANDS:
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        p.add_argument("--config", "-c", default=None, help="YAML config (default: the embedded conf/local.yaml)")
        p.add_argument(
            "--verbose", "-v", action="store_true",
            help="show Spark's full logging (Ivy's resolution report, Hive WARN lines) and DEBUG lines",
        )
        if name == "sql":
            p.add_argument("query", help='e.g. "SELECT count(*) FROM ers.crops"')
            p.add_argument("--limit", type=int, default=50, help="rows to print (default 50)")
        if name == "locate-ui":
            p.add_argument(
                "--from-members",
                metavar="UIC_ID",
                default=None,
                help="recompute a UIC from the stored members of UIC_ID with the current model (no clustering)",
            )
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ers_spark.runtime.logs import configure_logging

    configure_logging(verbose=args.verbose)
    try:
        overrides = list(args.overrides)
        if args.command == "locate-ui" and args.from_members:
            overrides.append(f"locate_ui.from_members={args.from_members}")
        if args.command == "demo":
            from ers_spark.demo import demo_overrides

            overrides = demo_overrides(overrides)
        cfg = load_config(args.config, overrides)
        check_java()
        if args.command == "run":
            run_pipeline(cfg)
        elif args.command == "demo":
            from ers_spark.demo import run_demo

            run_demo(cfg)
        elif args.command == "sql":
            from ers_spark.sql import run_sql

            print(run_sql(cfg, args.query, limit=args.limit))
        else:
            run_stage(cfg, args.command)
    except ErsUserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a Spark job failed: an executor's ErsUserError, a vanished file or store is one line
        user_error = user_error_from_executor(exc) or storage_error_from_job(exc)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return user_error.exit_code
    return 0


def job_main(stage: str) -> None:
    """Entry point of the thin spark-submit scripts in jobs/."""
    sys.exit(main([stage, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
