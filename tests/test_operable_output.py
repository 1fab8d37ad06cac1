"""Operable output: progress lines while stages run, a quiet first run, `--verbose` bringing the noise back."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ers_spark.cli import build_parser
from ers_spark.runtime import logs
from ers_spark.runtime.progress import StageSnapshot, progress_line, stage_progress
from ers_spark.versions import DELTA_PACKAGE


def _snap(stage_id: int, **kw) -> StageSnapshot:
    base = dict(stage_id=stage_id, name="count at x.py:1", num_tasks=8, completed=2, active=2, failed=0,
                submitted_ms=0, rows=None)
    return StageSnapshot(**{**base, **kw})


def test_progress_line_reports_tasks_and_rows_per_second() -> None:
    line = progress_line("embed", [_snap(3, rows=4000)], now_ms=2000)
    assert line == "embed: spark stage 3 (count at x.py:1): tasks 2/8 (2 running), 2,000 rows/s"


def test_progress_line_falls_back_to_tasks_per_second_and_sums_stages() -> None:
    line = progress_line("score", [_snap(5, completed=1, failed=1, name="$anonfun$x"), _snap(4)], now_ms=4000)
    assert line == "score: spark stage 4 (count at x.py:1) +1 more: tasks 3/16 (4 running, 1 failed), 0.75 tasks/s"


def test_verbose_flag_on_every_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["demo", "--verbose"]).verbose is True
    assert parser.parse_args(["ingest", "-v", "ingest.input_path=x"]).verbose is True
    assert parser.parse_args(["sql", "SELECT 1"]).verbose is False


def test_quiet_settings_combine_java_options_and_verbose_drops_them(tmp_path: Path) -> None:
    from ers_spark.config import load_config
    from ers_spark.runtime.session import session_settings

    cfg = load_config(overrides=[f"storage.root={tmp_path / 'lake'}"])
    try:
        quiet = session_settings(cfg, "t")["spark.driver.extraJavaOptions"].split()
        assert f"-Dderby.system.home={tmp_path / 'lake'}" in quiet  # the Derby option is kept
        assert f"-Dlog4j2.configurationFile={logs.QUIET_LOG4J}" in quiet
        logs.configure_logging(verbose=True)
        verbose = session_settings(cfg, "t")["spark.driver.extraJavaOptions"]
        assert "log4j2" not in verbose and "derby.system.home" in verbose
    finally:
        logs.configure_logging(verbose=False)
    assert logs.QUIET_LOG4J.is_file()


def test_ivy_filter_hides_the_report_only_while_launching() -> None:
    """The stderr filter drops Ivy's report (start line .. 'artifacts copied') and keeps everything else."""
    read_fd, write_fd = os.pipe()
    out_read, out_write = os.pipe()
    filt = logs._LaunchFilter(read_fd, out_write)
    filt.start()
    lines = [
        b":: loading settings :: url = jar:file:/x/ivy.jar!/ivysettings.xml\n",
        "\tfound {}#{};{} in central\n".format(*DELTA_PACKAGE.split(":")).encode(),
        b"You probably access the destination server through a proxy server that is not well configured.\n",
        b"\tHost repos.spark-packages.org not found. url=https://repos.spark-packages.org/a.jar\n",
        b"\t0 artifacts copied, 33 already retrieved (0kB/5ms)\n",
        b"a JVM line that stays\n",
    ]
    os.write(write_fd, b"".join(lines))
    deadline = time.monotonic() + 10
    while len(filt.hidden) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert filt.launched(ok=True) == 5
    os.write(write_fd, b":: loading settings :: after the launch: shown\n")
    os.close(write_fd)
    filt.join(10)
    with os.fdopen(out_read, "rb") as out:
        assert out.read() == b"a JVM line that stays\n:: loading settings :: after the launch: shown\n"


@pytest.mark.spark
def test_progress_lines_while_a_spark_job_runs(spark, tmp_path: Path, caplog) -> None:
    """A real Spark job that outlasts a few tracker periods gets progress lines naming the stage and its tasks."""
    def slow(batches):
        for batch in batches:
            time.sleep(0.4)
            yield batch

    spark.range(0, 400, numPartitions=4).write.parquet(str(tmp_path / "rows"))
    df = spark.read.parquet(str(tmp_path / "rows")).repartition(4).mapInPandas(slow, "id long")
    with caplog.at_level(logging.INFO, logger="ers_spark.runtime.progress"):
        with stage_progress(spark, "progress-test", interval=0.1) as progress:
            assert df.count() == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "ers_spark.runtime.progress"]
    assert progress.lines == len(lines) >= 1
    assert all(line.startswith("progress-test: spark stage ") and " tasks " in line for line in lines)
    assert any(line.endswith("rows/s") or line.endswith("tasks/s") for line in lines)


def _write_images(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 40), (40 * i, 90, 160)).save(folder / f"img{i}.png")


DEMO_STDERR_LINES = 40  # what a newcomer's first `ers-spark demo` may print on stderr, at most


@pytest.mark.spark
def test_first_run_is_quiet_and_verbose_brings_the_noise_back(demo_first_run, tmp_path: Path) -> None:
    """A first `ers-spark demo` in a fresh process and home (the run the demo lake of the tests comes from):
    its summary on stdout, under 40 lines on stderr (progress and the stages' lines, no Ivy, Hive or Spark
    WARN noise); `--verbose` on a 3-image ingest in a fresh process shows that noise."""
    from conftest import machine_cache_overrides

    images = tmp_path / "images"
    _write_images(images)
    verbose_cmd = [sys.executable, "-m", "ers_spark.cli", "ingest", "--verbose", f"ingest.input_path={images}",
                   f"storage.root={tmp_path / 'verbose'}", "spark.master=local[1]", "spark.shuffle_partitions=1",
                   "spark.driver_memory=1g", f"spark.checkpoint_dir={tmp_path / 'verbose' / 'ckpt'}",
                   *machine_cache_overrides()]
    proc = subprocess.run(verbose_cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ingest_out, verbose = proc.stdout, proc.stderr
    demo_out, quiet = demo_first_run["stdout"], demo_first_run["stderr"]
    assert "Open the report:" in demo_out and (demo_first_run["home"] / ".ers-spark" / "demo" / "lake").is_dir()
    # the default model's spec aligns: every crop reached the model as a dlib chip or, without a face, resized
    embed = next(r for r in demo_first_run["records"] if r["stage"] == "embed")
    assert embed["params"]["model_version"].endswith("+dlib_chip150p0.25") and embed["counts"]["aligned"] > 0
    assert (f"  embedded:         {embed['counts']['written']}, aligned as the model was trained (dlib_chip, "
            f"padding 0.25): {embed['counts']['aligned']} chips of a detected face") in demo_out
    assert len(quiet.splitlines()) < DEMO_STDERR_LINES, quiet
    assert "ers_spark.stages.locate_ui: locate-ui: chose eps=" in quiet
    for noise in (":: resolution report ::", ":: loading settings ::", "Hive SerDe", "found io.delta#",
                  "You probably access the destination server", "Using Spark's default log4j profile",
                  "locally checkpointed", "Could not validate number of records", "top sizes ["):
        assert noise not in quiet, noise
    assert json.loads(ingest_out.strip().splitlines()[-1])["counts"]["written"] == 3
    assert "Hive SerDe" in verbose  # Spark's WARN on every Delta table in the Hive metastore
    assert ":: resolution report ::" in verbose  # Ivy's report (printed on every start, cached or not)
