"""Config loading and validation: one-line errors naming the key and the file, before Spark starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ers_spark.config import embedded_config_path, load_config
from ers_spark.errors import ConfigError
from ers_spark.runtime.session import session_settings
from ers_spark.versions import DELTA_PACKAGE


def test_embedded_default_is_local_with_delta() -> None:
    cfg = load_config()
    assert cfg.spark.master == "local[*]"
    assert cfg.source == str(embedded_config_path())
    settings = session_settings(cfg, "ingest")
    assert settings["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert settings["spark.sql.catalog.spark_catalog"] == "org.apache.spark.sql.delta.catalog.DeltaCatalog"
    assert settings["spark.app.name"] == "ers-spark-ingest"
    assert settings["spark.sql.execution.arrow.maxRecordsPerBatch"] == str(cfg.spark.arrow_max_records_per_batch)
    assert settings["spark.jars.packages"] == DELTA_PACKAGE


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
        ("locate_ui.kmeans_cells=1 locate_ui.nprobe=40", "locate_ui.nprobe (40) cannot exceed locate_ui.kmeans_cells (1) (in {src})"),
        ("locate_ui.max_cell_rows=1", "locate_ui.max_cell_rows must be >= 2, got 1 (in {src})"),
        ("scor.gamma=0.1", "unknown config key 'scor' in {src}; did you mean 'score'?"),
    ],
)
def test_bad_values_name_the_key_and_file(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=override.split())
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


def test_object_store_example_puts_everything_in_the_store() -> None:
    """Every path of the object-store example is one a remote cluster can use (no local path stops it)."""
    from ers_spark.runtime.cluster_paths import require_shared_paths, stage_paths

    cfg = load_config(Path(__file__).resolve().parents[1] / "conf" / "object-store.example.yaml")
    assert cfg.storage.table_path("crops") == "s3a://my-bucket/ers/lake/crops"
    assert cfg.report.output_path(cfg.storage) == "s3a://my-bucket/ers/lake/report.html"
    assert cfg.spark.conf["spark.delta.logStore.s3a.impl"] == "io.ersspark.delta.S3ConditionalLogStore"
    for stage in ("ingest", "embed", "evaluate"):
        require_shared_paths(cfg, "spark://master:7077", stage_paths(cfg, stage))


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


def test_defaults_live_only_in_the_embedded_file() -> None:
    """The dataclasses declare no defaults; conf/local.yaml names every key of every section."""
    import dataclasses

    import yaml

    from ers_spark.config import ErsConfig

    embedded = yaml.safe_load(embedded_config_path().read_text())
    cfg = load_config()
    for section in dataclasses.fields(ErsConfig):
        if section.name == "source":
            continue
        fields = dataclasses.fields(getattr(cfg, section.name))
        with_default = [f.name for f in fields
                        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert with_default == [], f"{section.name}: defaults belong in conf/local.yaml, not the dataclass"
        assert sorted(embedded[section.name]) == sorted(f.name for f in fields), section.name


def test_user_file_is_laid_over_the_defaults(tmp_path: Path) -> None:
    conf = tmp_path / "small.yaml"
    conf.write_text("embed:\n  batch_size: 8\nspark:\n  conf:\n    spark.executor.memory: 8g\n")
    cfg = load_config(conf)
    assert cfg.source == str(conf)
    assert cfg.embed.batch_size == 8
    assert cfg.embed.device == load_config().embed.device  # a key the file leaves out keeps the default
    assert cfg.spark.conf == {"spark.executor.memory": "8g"}  # a key the file sets is replaced whole
    assert cfg.locate_ui == load_config().locate_ui


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("clean.subcenters=0", "clean.subcenters must be >= 1, got 0"),
        ("score.calibration=guess", "score.calibration must be 'auto', 'identities' or 'unlabelled', got 'guess'"),
        ("locate_ui.block_size=0", "locate_ui.block_size must be >= 1, got 0"),
        ("embed.fp16=true", "embed.fp16 needs embed.backend=torch"),
    ],
)
def test_bad_stage_value_is_one_line_exit_2(override: str, message: str) -> None:
    """A stage never re-validates its parameters: the config's one check gives the one-line exit 2."""
    stage = override.split(".")[0].replace("_", "-")
    proc = subprocess.run([sys.executable, "-m", "ers_spark.cli", stage, override],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {message}"), line
