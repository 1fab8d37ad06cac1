"""The ``ers-spark sql "..."`` examples of README.md, for the tests that run each on a lake that has its tables."""

from __future__ import annotations

import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
EVALUATE_TABLES = ("eval_runs", "eval_metrics", "eval_curves")


def readme_sql_queries() -> list[str]:
    """Every `ers-spark sql "..."` example in the README, in README's order."""
    queries = []
    for line in README.read_text().splitlines():
        line = line.strip()
        if line.startswith("ers-spark sql "):
            queries.append(shlex.split(line)[2])
    return queries


def reads_evaluate_tables(query: str) -> bool:
    return any(f"ers.{table}" in query for table in EVALUATE_TABLES)


def pipeline_queries() -> list[str]:
    """The queries over the pipeline's tables (tests/test_pipeline.py runs them on the demo lake)."""
    return [q for q in readme_sql_queries() if not reads_evaluate_tables(q)]


def evaluate_queries() -> list[str]:
    """The queries over evaluate's tables (tests/test_evaluate.py runs them on its evaluated lake)."""
    return [q for q in readme_sql_queries() if reads_evaluate_tables(q)]
