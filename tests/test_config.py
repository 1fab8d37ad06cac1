"""Config loading and validation: one-line errors naming the key and the file, before Spark starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ers_spark.config import embedded_config_path, load_config
from ers_spark.errors import ConfigError
from ers_spark.lake.session import session_settings


def test_embedded_default_is_local_with_delta() -> None:
    cfg = load_config()
    assert cfg.spark.master == "local[*]"
    assert cfg.source == str(embedded_config_path())
    settings = session_settings(cfg, "ingest")
    assert settings["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert settings["spark.sql.catalog.spark_catalog"] == "org.apache.spark.sql.delta.catalog.DeltaCatalog"
    assert settings["spark.app.name"] == "ers-spark-ingest"
    assert settings["spark.sql.execution.arrow.maxRecordsPerBatch"] == str(cfg.spark.arrow_max_records_per_batch)
    assert settings["spark.jars.packages"].startswith("io.delta:delta-spark_4.2_2.13:")


def test_overrides_are_typed() -> None:
    cfg = load_config(overrides=["embed.batch_size=16", "locate_ui.eps=0.3", "score.gamma=0.1", "clean.label_noise=false"])
    assert cfg.embed.batch_size == 16
    assert cfg.locate_ui.eps == pytest.approx(0.3)
    assert cfg.score.gamma == pytest.approx(0.1)
    assert cfg.clean.label_noise is False


def test_int_accepted_where_float_expected() -> None:
    assert load_config(overrides=["locate_ui.dominance_ratio=20"]).locate_ui.dominance_ratio == 20.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ingest.inptu_path=/x", "unknown config key 'ingest.inptu_path' in {src}; did you mean 'ingest.input_path'?"),
        ("embed.batch_size=abc", "config key 'embed.batch_size' must be an integer, got 'abc' (in {src})"),
        ("clean.label_noise=maybe", "config key 'clean.label_noise' must be true or false, got 'maybe' (in {src})"),
        ("embed.backend=tensorflow", "embed.backend must be 'onnx' or 'torch', got 'tensorflow' (in {src})"),
        ("locate_ui.nprobe=40", "locate_ui.nprobe (40) cannot exceed locate_ui.kmeans_cells (16) (in {src})"),
        ("scor.gamma=0.1", "unknown config key 'scor' in {src}; did you mean 'score'?"),
    ],
)
def test_bad_values_name_the_key_and_file(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert str(info.value) == message.format(src=embedded_config_path())


def test_unknown_key_in_file(tmp_path: Path) -> None:
    conf = tmp_path / "bad.yaml"
    conf.write_text("storage:\n  rooot: /data\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'storage.rooot' in {conf}; did you mean 'storage.root'\?"):
        load_config(conf)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file .*nope.yaml not found"):
        load_config(tmp_path / "nope.yaml")


def test_ingest_requires_existing_input(tmp_path: Path) -> None:
    cfg = load_config()
    with pytest.raises(ConfigError, match="ingest.input_path is required for ingest"):
        cfg.ingest.require_input(cfg.source)
    cfg = load_config(overrides=[f"ingest.input_path={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="ingest.input_path: .*missing' does not exist"):
        cfg.ingest.require_input(cfg.source)


def test_cluster_example_is_valid() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "conf" / "cluster.example.yaml")
    assert cfg.spark.master is None
    assert cfg.storage.table_path("crops") == "s3a://my-bucket/ers/lake/crops"


def test_cli_misspelled_key_exits_2_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ers_spark.cli", "ingest", "ingest.inptu_path=/tmp/x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unknown config key 'ingest.inptu_path'")
    assert "Traceback" not in proc.stderr
