"""Progress lines while a stage's Spark jobs run, from Spark's status tracker.

A background thread looks at ``SparkContext.statusTracker()`` every few seconds and, while a
Spark job is active, logs one line: the ers-spark stage, the active Spark stage(s), tasks
done/total and rows/s (rows read by the active stages, from Spark's status store; tasks/s
when Spark reports no row counts)::

    12:03:04 INFO ers_spark.runtime.progress: embed: spark stage 7 (mapInPandas at ...): tasks 5/16 (2 running), 812 rows/s

``ERS_SPARK_PROGRESS_INTERVAL`` (seconds, default 5) sets the first period; after each line the
period doubles, up to a minute, so a stage of a minute logs a few lines and an hour-long one about
one a minute (a demo's stderr stays short; a long job still shows it is alive).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0
MAX_INTERVAL_S = 60.0  # the period stops doubling here


def progress_interval() -> float:
    try:
        return max(0.05, float(os.environ.get("ERS_SPARK_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


@dataclass(frozen=True)
class StageSnapshot:
    """One active Spark stage as the status tracker sees it."""

    stage_id: int
    name: str
    num_tasks: int
    completed: int
    active: int
    failed: int
    submitted_ms: int
    rows: int | None = None  # rows read so far (input + shuffle read); None when unknown


def progress_line(stage: str, snapshots: list[StageSnapshot], now_ms: int) -> str:
    """The one progress line for the active Spark stages of ``stage`` (pure; tested without Spark)."""
    snapshots = sorted(snapshots, key=lambda s: s.stage_id)
    first = snapshots[0]
    name = first.name.strip()
    label = f"spark stage {first.stage_id}" + (f" ({name})" if name and not name.startswith("$anonfun") else "")
    if len(snapshots) > 1:
        label += f" +{len(snapshots) - 1} more"
    done = sum(s.completed for s in snapshots)
    total = sum(s.num_tasks for s in snapshots)
    running = sum(s.active for s in snapshots)
    elapsed_s = max(1.0, (now_ms - min(s.submitted_ms for s in snapshots)) / 1000.0)
    line = f"{stage}: {label}: tasks {done}/{total} ({running} running"
    failed = sum(s.failed for s in snapshots)
    line += f", {failed} failed)" if failed else ")"
    rows = [s.rows for s in snapshots if s.rows is not None]
    if rows and sum(rows) > 0:
        rate = sum(rows) / elapsed_s
        line += f", {rate:,.0f} rows/s" if rate >= 10 else f", {rate:.1f} rows/s"
    else:
        line += f", {done / elapsed_s:.2f} tasks/s"
    return line


def _status_store(spark: Any) -> dict[int, tuple[int, int | None]]:
    """Per active stage: rows read so far (input + shuffle read) and submission time (ms), from the
    JVM's status store; empty when that internal API is unavailable (then: tasks/s, first-seen time)."""
    try:
        stages = spark.sparkContext._jsc.sc().statusStore().activeStages()
        out = {}
        for i in range(stages.size()):
            data = stages.apply(i)
            submitted = data.submissionTime()
            out[int(data.stageId())] = (
                int(data.inputRecords()) + int(data.shuffleReadRecords()),
                int(submitted.get().getTime()) if submitted.isDefined() else None,
            )
        return out
    except Exception:  # noqa: BLE001 - internal API: fall back to tasks/s
        return {}


def snapshot(spark: Any, first_seen: dict[int, int] | None = None) -> list[StageSnapshot]:
    """The active Spark stages right now (empty when no job runs).

    ``first_seen`` (stage id -> ms) stands in for the submission time when the status store has none.
    """
    tracker = spark.sparkContext.statusTracker()
    infos = [info for info in (tracker.getStageInfo(i) for i in tracker.getActiveStageIds()) if info is not None]
    if not infos:
        return []
    store = _status_store(spark)
    now_ms = int(time.time() * 1000)
    first_seen = {} if first_seen is None else first_seen
    snapshots = []
    for info in infos:
        rows, submitted = store.get(info.stageId, (None, None))
        snapshots.append(
            StageSnapshot(
                stage_id=info.stageId,
                name=info.name,
                num_tasks=info.numTasks,
                completed=info.numCompletedTasks,
                active=info.numActiveTasks,
                failed=info.numFailedTasks,
                submitted_ms=submitted or first_seen.setdefault(info.stageId, now_ms),
                rows=rows,
            )
        )
    return snapshots


class StageProgress:
    """Context manager: log a progress line while a Spark job is active, first after ``interval`` seconds,
    then at doubling periods up to :data:`MAX_INTERVAL_S` (or ``interval`` when that is longer)."""

    def __init__(self, spark: Any, stage: str, interval: float | None = None) -> None:
        self.spark = spark
        self.stage = stage
        self.interval = progress_interval() if interval is None else interval
        self.lines = 0
        self._first_seen: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ers-spark-progress-{stage}", daemon=True)

    def __enter__(self) -> "StageProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, 2 * self.interval))

    def _run(self) -> None:
        period, longest = self.interval, max(self.interval, MAX_INTERVAL_S)
        while not self._stop.wait(period):
            try:
                snapshots = snapshot(self.spark, self._first_seen)
            except Exception as exc:  # noqa: BLE001 - never let progress reporting fail a stage
                log.debug("progress: status tracker unavailable (%s); no more progress lines", exc)
                return
            if snapshots and not self._stop.is_set():
                log.info(progress_line(self.stage, snapshots, int(time.time() * 1000)))
                self.lines += 1
                period = min(2 * period, longest)


def stage_progress(spark: Any, stage: str, interval: float | None = None) -> StageProgress:
    """``with stage_progress(spark, "embed"): ...`` logs progress while the block's Spark jobs run."""
    return StageProgress(spark, stage, interval)
