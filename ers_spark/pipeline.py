"""Run stages by name: one stage in its session, or the whole pipeline in order.

Both the command line (:mod:`ers_spark.cli`) and the demo (:mod:`ers_spark.demo`)
use this module, so neither imports the other.
"""

from __future__ import annotations

import logging
from typing import Callable

from ers_spark.config import ErsConfig

log = logging.getLogger(__name__)

STAGES = ("ingest", "embed", "locate-ui", "score", "clean")


def stage_runner(name: str) -> Callable[..., dict]:
    """Import a stage lazily so `--help` and config errors never start a JVM."""
    if name == "ingest":
        from ers_spark.stages.ingest import run_ingest

        return run_ingest
    if name == "embed":
        from ers_spark.stages.embed import run_embed

        return run_embed
    if name == "locate-ui":
        from ers_spark.stages.locate_ui import run_locate_ui

        return run_locate_ui
    if name == "score":
        from ers_spark.stages.score import run_score

        return run_score
    if name == "clean":
        from ers_spark.stages.clean import run_clean

        return run_clean
    if name == "report":
        from ers_spark.stages.report import run_report

        return run_report
    if name == "evaluate":  # not in STAGES: `run` does not evaluate; `ers-spark evaluate` does
        from ers_spark.stages.evaluate import run_evaluate

        return run_evaluate
    if name == "import-embeddings":  # not in STAGES: `run` starts from images; this replaces ingest + embed
        from ers_spark.stages.import_embeddings import run_import_embeddings

        return run_import_embeddings
    if name == "maintain":  # not in STAGES: table upkeep (OPTIMIZE + VACUUM), run on its own schedule
        from ers_spark.stages.maintain import run_maintain

        return run_maintain
    raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")


def check_stage_config(cfg: ErsConfig, stage: str) -> None:
    """Keys only this stage needs, checked before its JVM starts: a missing one is a one-line error at once."""
    if stage == "import-embeddings":
        cfg.import_embeddings.require(cfg.source)


def run_stage(cfg: ErsConfig, stage: str) -> dict:
    """Build the session for ``stage`` and run it, logging progress while its Spark jobs run."""
    from ers_spark.runtime.progress import stage_progress
    from ers_spark.runtime.session import build_session

    check_stage_config(cfg, stage)
    spark = build_session(cfg, stage)
    with stage_progress(spark, stage):
        return stage_runner(stage)(spark, cfg)


def run_pipeline(cfg: ErsConfig) -> list[dict]:
    """ingest (when an input is configured) -> embed -> locate-ui -> score -> clean, in one session."""
    records = []
    for stage in STAGES:
        if stage == "ingest" and not cfg.ingest.input_path:
            log.warning("ingest skipped: ingest.input_path is not set; using the existing crops table")
            continue
        records.append(run_stage(cfg, stage))
    return records
