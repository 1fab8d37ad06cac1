"""The one config loader: a YAML file plus ``key=value`` overrides, typed and validated before Spark starts.

Defaults live in one place: the embedded ``conf/local.yaml`` (shipped inside the
package as ``ers_spark/conf/local.yaml``; master ``local[*]``, Delta tables under a
local folder). The dataclasses below declare types and validation only, no
defaults. A user's file is laid over the embedded one key by key (a key it sets
replaces the default's value whole; keys it leaves out keep the default), then
the ``section.key=value`` overrides. An unknown key, a wrong type or a bad value
is a :class:`ConfigError` whose one-line message names the key and the file; it
is checked here once, and the stages trust it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from ers_spark.errors import ConfigError
from ers_spark.versions import PACKAGES

EMBEDDED_CONFIG_NAME = "local.yaml"
MIN_SAMPLE_ROWS_PER_CELL = 16  # the quantiser's driver sample per coarse cell (fewer: k-means cells of noise)


def embedded_config() -> Any:
    """The embedded default config as a Traversable (a file, or a member of the --py-files zip)."""
    return resources.files("ers_spark").joinpath("conf", EMBEDDED_CONFIG_NAME)


def embedded_config_path() -> Path:
    """Path of the embedded default config (``ers_spark/conf/local.yaml``)."""
    return Path(str(embedded_config()))


@dataclass(frozen=True)
class SparkConfig:
    """How the one SparkSession is built (see :mod:`ers_spark.runtime.session`).

    ``packages`` holds Maven coordinates: the loader turns the names the YAML may use instead
    (``delta``, ``graphframes``) into the versions pinned in :mod:`ers_spark.versions`.
    """

    master: str | None
    app_name_prefix: str
    shuffle_partitions: int
    arrow_max_records_per_batch: int
    arrow_max_bytes_per_batch: str
    driver_memory: str | None
    packages: list[str]
    jars_dir: str | None
    checkpoint_dir: str
    log_level: str
    hive_metastore: bool
    shared_filesystem: bool
    conf: dict[str, str]

    def validate(self, source: str) -> None:
        if self.shuffle_partitions < 1:
            raise ConfigError(f"spark.shuffle_partitions must be >= 1, got {self.shuffle_partitions} (in {source})")
        if self.arrow_max_records_per_batch < 1:
            raise ConfigError(
                f"spark.arrow_max_records_per_batch must be >= 1, got {self.arrow_max_records_per_batch} (in {source})"
            )
        if self.jars_dir is not None and not Path(self.jars_dir).is_dir():
            raise ConfigError(
                f"spark.jars_dir: folder {self.jars_dir!r} does not exist (in {source}); "
                "fill it with deploy/fetch_jars.sh or remove the key"
            )


@dataclass(frozen=True)
class StorageConfig:
    """Where the Delta tables live and how they are registered in the catalog."""

    root: str
    database: str
    warehouse_dir: str | None

    def table_path(self, table: str) -> str:
        root = self.root
        if "://" in root:
            return f"{root.rstrip('/')}/{table}"
        return str(Path(os.path.expanduser(root)).resolve() / table)

    def local_root(self) -> Path | None:
        """The root as a local folder, or None for object stores (s3a://, abfss://, gs://)."""
        if "://" in self.root and not self.root.startswith("file://"):
            return None
        return Path(os.path.expanduser(self.root.removeprefix("file://"))).resolve()

    def validate(self, source: str) -> None:
        if not self.root:
            raise ConfigError(f"storage.root must name a folder or an object-store URI (in {source})")
        if not self.database.isidentifier():
            raise ConfigError(f"storage.database must be a SQL identifier, got {self.database!r} (in {source})")


@dataclass(frozen=True)
class IngestConfig:
    """Parameters of the ingest stage (images or Parquet -> crops)."""

    input_path: str | None
    input_format: str
    extensions: list[str]
    recursive: bool
    identity_from_folder: bool
    bytes_column: str
    path_column: str | None
    identity_column: str | None

    def validate(self, source: str) -> None:
        if self.input_format not in ("images", "parquet"):
            raise ConfigError(
                f"ingest.input_format must be 'images' or 'parquet', got {self.input_format!r} (in {source})"
            )
        if not self.extensions:
            raise ConfigError(f"ingest.extensions must list at least one extension (in {source})")

    @property
    def suffixes(self) -> tuple[str, ...]:
        """The extensions lower-cased and without their dot (``.JPG`` -> ``jpg``)."""
        return tuple(e.lower().lstrip(".") for e in self.extensions)

    def require_input(self, source: str) -> str:
        """The input path, which the ingest stage needs (other stages do not)."""
        if not self.input_path:
            raise ConfigError(
                f"ingest.input_path is required for ingest (in {source}); pass ingest.input_path=/path/to/images"
            )
        if "://" not in self.input_path and not Path(self.input_path).exists():
            raise ConfigError(f"ingest.input_path: {self.input_path!r} does not exist (in {source})")
        return self.input_path


@dataclass(frozen=True)
class EmbedConfig:
    """Parameters of the embed stage (crops -> embeddings)."""

    model: str
    backend: str
    device: str
    batch_size: int
    intra_op_threads: int
    fp16: bool
    align: bool | str
    model_cache_dir: str
    max_failed_share: float
    no_face: str
    align_min_side: int
    gpus_per_task: float | None
    gpus_per_executor: int

    def validate(self, source: str) -> None:
        if self.gpus_per_task is not None and not 0 < self.gpus_per_task <= max(self.gpus_per_executor, 1):
            raise ConfigError(f"embed.gpus_per_task must be null or in (0, embed.gpus_per_executor="
                              f"{self.gpus_per_executor}], got {self.gpus_per_task} (in {source})")
        if self.gpus_per_executor < 1:
            raise ConfigError(f"embed.gpus_per_executor must be >= 1, got {self.gpus_per_executor} (in {source})")
        if self.align not in (True, False, "auto"):
            raise ConfigError(f"embed.align must be auto, true or false, got {self.align!r} (in {source})")
        if self.no_face not in ("embed_unaligned", "quarantine"):
            raise ConfigError(
                f"embed.no_face must be 'embed_unaligned' or 'quarantine', got {self.no_face!r} (in {source})"
            )
        if self.align_min_side < 0:
            raise ConfigError(f"embed.align_min_side must be >= 0, got {self.align_min_side} (in {source})")
        if not 0.0 < self.max_failed_share <= 1.0:
            raise ConfigError(f"embed.max_failed_share must be in (0, 1], got {self.max_failed_share} (in {source})")
        if self.backend not in ("onnx", "torch"):
            raise ConfigError(f"embed.backend must be 'onnx' or 'torch', got {self.backend!r} (in {source})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"embed.device must be 'auto', 'cpu' or 'cuda', got {self.device!r} (in {source})")
        if self.batch_size < 1:
            raise ConfigError(f"embed.batch_size must be >= 1, got {self.batch_size} (in {source})")
        if self.intra_op_threads < 0:
            raise ConfigError(f"embed.intra_op_threads must be >= 0, got {self.intra_op_threads} (in {source})")
        if self.fp16 and self.backend != "torch":
            raise ConfigError(f"embed.fp16 needs embed.backend=torch (ONNX Runtime runs the fp32 graph) (in {source})")


@dataclass(frozen=True)
class LocateUiConfig:
    """Parameters of locate-ui (embeddings -> ui_centroids, ui_members)."""

    method: str
    eps: float | None
    eps_grid_start: float
    eps_grid_stop: float
    eps_grid_step: float
    dominance_ratio: float
    min_share: float
    identity_min_size: int
    identity_tolerance: float
    grid_sample_rows: int
    sample_hac_rows: int
    kmeans_cells: int | None
    max_top_cells: int
    kmeans_sample_rows: int
    nprobe: int
    max_cell_rows: int
    block_size: int
    connected_components: str
    cc_one_task_max_links: int
    seed: int
    from_members: str | None
    recompute: bool

    @property
    def eps_grid(self) -> tuple[float, ...]:
        """The eps values the grid rule tries: ``eps_grid_start`` to ``eps_grid_stop`` by ``eps_grid_step``.

        >>> load_config(overrides=["locate_ui.eps_grid_start=0.1", "locate_ui.eps_grid_stop=0.3",
        ...                        "locate_ui.eps_grid_step=0.05"]).locate_ui.eps_grid
        (0.1, 0.15, 0.2, 0.25, 0.3)
        """
        import numpy as np

        grid = np.arange(self.eps_grid_start, self.eps_grid_stop + self.eps_grid_step / 2, self.eps_grid_step)
        return tuple(float(round(g, 10)) for g in grid)

    def _check_sample_covers_cells(self, source: str) -> None:
        """The quantiser's driver sample must hold ``MIN_SAMPLE_ROWS_PER_CELL`` rows per coarse cell."""
        cells = self.kmeans_cells if self.kmeans_cells is not None else self.max_top_cells
        if self.kmeans_sample_rows < MIN_SAMPLE_ROWS_PER_CELL * cells:
            name = "kmeans_cells" if self.kmeans_cells is not None else "max_top_cells"
            raise ConfigError(
                f"locate_ui.kmeans_sample_rows ({self.kmeans_sample_rows}) must be at least {MIN_SAMPLE_ROWS_PER_CELL} x "
                f"locate_ui.{name} ({cells}): k-means needs that many sampled rows per coarse cell (in {source})"
            )

    def validate(self, source: str) -> None:
        if self.method not in ("graph", "sample-hac"):
            raise ConfigError(f"locate_ui.method must be 'graph' or 'sample-hac', got {self.method!r} (in {source})")
        if self.eps is not None and not 0 < self.eps < 2:
            raise ConfigError(f"locate_ui.eps must be in (0, 2) (cosine distance), got {self.eps} (in {source})")
        if not 0 < self.eps_grid_start <= self.eps_grid_stop < 2 or self.eps_grid_step <= 0:
            raise ConfigError(
                "locate_ui.eps_grid_start/stop/step must satisfy 0 < start <= stop < 2 and step > 0 "
                f"(in {source})"
            )
        if self.dominance_ratio < 1:
            raise ConfigError(f"locate_ui.dominance_ratio must be >= 1, got {self.dominance_ratio} (in {source})")
        if self.identity_min_size < 2 or not 0 <= self.identity_tolerance < 1:
            raise ConfigError(
                f"locate_ui.identity_min_size must be >= 2 and locate_ui.identity_tolerance in [0, 1), got "
                f"{self.identity_min_size} and {self.identity_tolerance} (in {source})"
            )
        if not 0 <= self.min_share <= 1:
            raise ConfigError(f"locate_ui.min_share must be in [0, 1], got {self.min_share} (in {source})")
        for name in ("grid_sample_rows", "sample_hac_rows", "kmeans_cells", "max_top_cells", "kmeans_sample_rows",
                     "nprobe", "block_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"locate_ui.{name} must be >= 1, got {getattr(self, name)} (in {source})")
        if self.cc_one_task_max_links < 0:
            raise ConfigError(
                f"locate_ui.cc_one_task_max_links must be >= 0, got {self.cc_one_task_max_links} (in {source})"
            )
        if self.max_cell_rows < 2:
            raise ConfigError(f"locate_ui.max_cell_rows must be >= 2, got {self.max_cell_rows} (in {source})")
        self._check_sample_covers_cells(source)
        if self.kmeans_cells is not None and self.nprobe > self.kmeans_cells:
            raise ConfigError(
                f"locate_ui.nprobe ({self.nprobe}) cannot exceed locate_ui.kmeans_cells ({self.kmeans_cells}) (in {source})"
            )
        if self.connected_components not in ("builtin", "graphframes"):
            raise ConfigError(
                "locate_ui.connected_components must be 'builtin' or 'graphframes', "
                f"got {self.connected_components!r} (in {source})"
            )


@dataclass(frozen=True)
class ScoreConfig:
    """Parameters of the score stage (embeddings + UIC -> scores)."""

    gamma: float | None
    uic_id: str | None
    calibration: str
    target_far: float
    calibration_sample_rows: int
    calibration_share: float
    seed: int
    enhanced: bool

    def validate(self, source: str) -> None:
        if self.gamma is not None and not 0 <= self.gamma <= 1:
            raise ConfigError(f"score.gamma must be in [0, 1], got {self.gamma} (in {source})")
        if self.calibration not in ("auto", "identities", "unlabelled"):
            raise ConfigError(
                "score.calibration must be 'auto', 'identities' or 'unlabelled', "
                f"got {self.calibration!r} (in {source})"
            )
        if not 0 < self.target_far < 1:
            raise ConfigError(f"score.target_far must be in (0, 1), got {self.target_far} (in {source})")
        if self.calibration_sample_rows < 10:
            raise ConfigError(
                f"score.calibration_sample_rows must be >= 10, got {self.calibration_sample_rows} (in {source})"
            )
        if not 0 < self.calibration_share < 1:
            raise ConfigError(f"score.calibration_share must be in (0, 1), got {self.calibration_share} (in {source})")


@dataclass(frozen=True)
class CleanConfig:
    """Parameters of the clean stage (scores -> cleaned, quarantine)."""

    label_noise: bool
    subcenters: int
    max_angle_deg: float | None
    min_identity_size: int
    min_images_per_subcenter: int
    impostor_percentile: float
    genuine_percentile: float
    calibration_sample_rows: int
    calibration_identities: int
    max_identity_rows: int
    seed: int

    def validate(self, source: str) -> None:
        if self.max_identity_rows < self.min_identity_size or self.max_identity_rows < 2:
            raise ConfigError(
                f"clean.max_identity_rows must be >= 2 and >= clean.min_identity_size, got {self.max_identity_rows} "
                f"(in {source})"
            )
        if self.subcenters < 1:
            raise ConfigError(f"clean.subcenters must be >= 1, got {self.subcenters} (in {source})")
        if self.min_images_per_subcenter < 1 or self.min_identity_size < 1:
            raise ConfigError(
                f"clean.min_images_per_subcenter and clean.min_identity_size must be >= 1 (in {source})"
            )
        if not 0 < self.impostor_percentile < 100:
            raise ConfigError(
                f"clean.impostor_percentile must be in (0, 100), got {self.impostor_percentile} (in {source})"
            )
        if not 0 < self.genuine_percentile < 100:
            raise ConfigError(
                f"clean.genuine_percentile must be in (0, 100), got {self.genuine_percentile} (in {source})"
            )
        if self.calibration_sample_rows < 1 or self.calibration_identities < 2:
            raise ConfigError(
                "clean.calibration_sample_rows must be >= 1 and clean.calibration_identities >= 2 "
                f"(in {source})"
            )
        if self.max_angle_deg is not None and not 0 < self.max_angle_deg <= 180:
            raise ConfigError(f"clean.max_angle_deg must be in (0, 180], got {self.max_angle_deg} (in {source})")


@dataclass(frozen=True)
class ReportConfig:
    """Parameters of ``ers-spark report`` (the HTML page over the lake's tables)."""

    path: str | None
    title: str
    thumbnails_per_band: int
    thumbnail_px: int
    map_sample_rows: int
    histogram_bins: int
    curve_points: int
    eval_metric_rows: int
    seed: int

    def validate(self, source: str) -> None:
        for key in ("thumbnails_per_band", "thumbnail_px", "histogram_bins", "curve_points", "eval_metric_rows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"report.{key} must be >= 1, got {getattr(self, key)} (in {source})")
        if self.map_sample_rows < 3:
            raise ConfigError(f"report.map_sample_rows must be >= 3, got {self.map_sample_rows} (in {source})")

    def output_path(self, storage: StorageConfig) -> str:
        """The HTML file: ``report.path`` (a local path or a store URI), else ``report.html`` under ``storage.root``.

        >>> cfg = load_config(overrides=["storage.root=s3a://bucket/lake"])
        >>> cfg.report.output_path(cfg.storage)
        's3a://bucket/lake/report.html'
        """
        if self.path is not None:
            if "://" in self.path and not self.path.startswith("file:"):
                return self.path
            return str(Path(os.path.expanduser(self.path.removeprefix("file://").removeprefix("file:"))).resolve())
        return storage.table_path("report.html")


@dataclass(frozen=True)
class EvaluateConfig:
    """Parameters of the evaluate stage (embeddings + scores + identities -> eval_* tables).

    No defaults here: they live in ``conf/local.yaml`` only; a config file without an
    ``evaluate:`` section cannot run ``ers-spark evaluate`` (the stage says so).
    """

    pairs_path: str | None
    genuine_pairs_per_identity: int
    max_genuine_pairs: int
    impostor_pairs: int
    seed: int
    target_far: float
    calibration_share: float
    fars: list[float]
    fpirs: list[float]
    nonmated_identity_share: float
    enrolment: str
    max_probes: int
    template_size: int
    softmax_temperature: float
    top_k: int
    edc_fmr: float
    edc_max_discard: float
    edc_steps: int
    det_points: int
    write_report: bool

    def validate(self, source: str) -> None:
        positive = {
            "genuine_pairs_per_identity": self.genuine_pairs_per_identity, "max_genuine_pairs": self.max_genuine_pairs,
            "impostor_pairs": self.impostor_pairs, "max_probes": self.max_probes, "template_size": self.template_size,
            "top_k": self.top_k, "edc_steps": self.edc_steps,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"evaluate.{key} must be >= 1, got {value} (in {source})")
        shares = {"target_far": self.target_far, "calibration_share": self.calibration_share,
                  "nonmated_identity_share": self.nonmated_identity_share, "edc_fmr": self.edc_fmr,
                  "edc_max_discard": self.edc_max_discard}
        for key, value in shares.items():
            if not 0 < value < 1:
                raise ConfigError(f"evaluate.{key} must be in (0, 1), got {value} (in {source})")
        for key, rates in (("fars", self.fars), ("fpirs", self.fpirs)):
            if not rates or not all(0 < r < 1 for r in rates):
                raise ConfigError(f"evaluate.{key} must be a non-empty list of rates in (0, 1) (in {source})")
        if self.enrolment not in ("best_ers", "random"):
            raise ConfigError(f"evaluate.enrolment must be 'best_ers' or 'random', got {self.enrolment!r} (in {source})")
        if self.softmax_temperature <= 0:
            raise ConfigError(f"evaluate.softmax_temperature must be > 0, got {self.softmax_temperature} (in {source})")
        if self.det_points < 2:
            raise ConfigError(f"evaluate.det_points must be >= 2, got {self.det_points} (in {source})")


@dataclass(frozen=True)
class ImportEmbeddingsConfig:
    """Parameters of ``ers-spark import-embeddings`` (a user's vector table -> embeddings, imported_sources)."""

    input_path: str | None
    input_format: str
    id_column: str
    vector_column: str
    identity_column: str | None
    path_column: str | None
    model_name: str | None
    model_version: str | int | float | None  # YAML reads 3 or 1.5 as numbers; the stage stores the text

    def validate(self, source: str) -> None:
        if self.input_format not in ("parquet", "delta"):
            raise ConfigError(
                f"import_embeddings.input_format must be 'parquet' or 'delta', got {self.input_format!r} (in {source})"
            )

    @property
    def model(self) -> tuple[str, str]:
        """(model name, model version as text): the version is stored as text whatever YAML read it as."""
        return str(self.model_name), str(self.model_version)

    def require(self, source: str) -> None:
        """The keys the import needs and other stages do not: the input and the model that made the vectors."""
        for key in ("input_path", "model_name", "model_version"):
            if not getattr(self, key):
                raise ConfigError(
                    f"import_embeddings.{key} is required for import-embeddings (in {source}); "
                    f"pass import_embeddings.{key}=..."
                )
        if "://" not in str(self.input_path) and not Path(str(self.input_path)).exists():
            raise ConfigError(f"import_embeddings.input_path: {self.input_path!r} does not exist (in {source})")


@dataclass(frozen=True)
class MaintainConfig:
    """Parameters of ``ers-spark maintain`` (OPTIMIZE + VACUUM of every table)."""

    vacuum_retention_hours: float

    def validate(self, source: str) -> None:
        if self.vacuum_retention_hours < 0:
            raise ConfigError(
                f"maintain.vacuum_retention_hours must be >= 0, got {self.vacuum_retention_hours} (in {source})"
            )


@dataclass(frozen=True)
class ErsConfig:
    """The whole validated configuration."""

    spark: SparkConfig
    storage: StorageConfig
    ingest: IngestConfig
    embed: EmbedConfig
    locate_ui: LocateUiConfig
    score: ScoreConfig
    clean: CleanConfig
    evaluate: EvaluateConfig
    report: ReportConfig
    import_embeddings: ImportEmbeddingsConfig
    maintain: MaintainConfig
    source: str

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "source":
                getattr(self, f.name).validate(self.source)

    def with_overrides(self, overrides: list[str]) -> "ErsConfig":
        """A copy with ``section.key=value`` overrides applied and validated."""
        raw = to_dict(self)
        apply_overrides(raw, overrides, self.source)
        return _build(raw, self.source)


def to_dict(cfg: Any) -> dict[str, Any]:
    data = dataclasses.asdict(cfg)
    data.pop("source", None)
    return data


def _check_type(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against a simple type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__} (in {source})")
        return [_check_type(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__} (in {source})")
        return {str(k): str(v) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r} (in {source})")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r} (in {source})")
    if hint in (str, float) and not isinstance(value, hint):
        kind = "a string" if hint is str else "a number"
        raise ConfigError(f"config key '{key}' must be {kind}, got {value!r} (in {source})")
    return value


def _build(raw: Mapping[str, Any], source: str) -> ErsConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config {source} must be a YAML mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(ErsConfig) if f.name != "source"}
    built: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(_unknown_key_message(str(name), list(sections), source))
        section_type = typing.get_type_hints(ErsConfig)[name]
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"config section '{name}' must be a mapping (in {source})")
        hints = typing.get_type_hints(section_type)
        kwargs = {}
        for key, item in value.items():
            if key not in hints:
                raise ConfigError(_unknown_key_message(f"{name}.{key}", [f"{name}.{k}" for k in hints], source))
            kwargs[key] = _check_type(item, hints[key], f"{name}.{key}", source)
        missing = [k for k in hints if k not in kwargs]
        if missing:  # only a config laid over something other than the embedded defaults gets here
            raise ConfigError(f"config section '{name}' lacks {', '.join(missing)} (in {source})")
        if section_type is SparkConfig:  # pinned names -> their Maven coordinates
            kwargs["packages"] = pinned_packages(kwargs["packages"], source)
        built[name] = section_type(**kwargs)
    absent = [name for name in sections if name not in built]
    if absent:
        raise ConfigError(f"config lacks section(s) {', '.join(absent)} (in {source})")
    cfg = ErsConfig(**built, source=source)
    cfg.validate()
    return cfg


def pinned_packages(entries: list[str], source: str) -> list[str]:
    """``spark.packages`` as Maven coordinates: a name from :data:`ers_spark.versions.PACKAGES` becomes
    its pinned coordinate; an entry with a ``:`` is a coordinate and stays as written.

    >>> from ers_spark.versions import DELTA_PACKAGE
    >>> pinned_packages(["delta", "org.example:extra_2.13:1.0"], "x.yaml") == [DELTA_PACKAGE, "org.example:extra_2.13:1.0"]
    True
    """
    unknown = [e for e in entries if ":" not in e and e not in PACKAGES]
    if unknown:
        raise ConfigError(
            f"spark.packages: unknown package {unknown[0]!r} (in {source}); name one of {', '.join(PACKAGES)} "
            "(pinned in ers_spark/versions.py) or give a Maven coordinate group:artifact:version"
        )
    return [c for e in entries for c in ([e] if ":" in e else PACKAGES[e].split(","))]


def _unknown_key_message(key: str, known: list[str], source: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"
    return f"unknown config key '{key}' in {source}{hint}"


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> None:
    """Apply ``section.key=value`` overrides in place; values are parsed as YAML scalars."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        dotted, text = override.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {dotted!r} must look like section.key (e.g. storage.root)")
        section, key = parts
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(_unknown_key_message(section, list(raw), f"{source} (override {override!r})"))
        raw[section][key] = value


def _read_yaml(path: Any, source: str) -> dict[str, Any]:
    """One YAML config file as a mapping of sections, or a one-line ConfigError."""
    if not path.is_file():
        raise ConfigError(f"config file {source} not found; pass --config PATH or omit it to use the embedded default")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {source} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source} must be a YAML mapping of sections, got {type(raw).__name__}")
    return raw


def lay_over(defaults: dict[str, Any], user: dict[str, Any], source: str) -> dict[str, Any]:
    """The user's sections laid over the defaults: a key the user sets replaces the default's value whole."""
    merged = {name: dict(section or {}) for name, section in defaults.items()}
    for name, section in user.items():
        if section is None:
            continue
        if not isinstance(section, Mapping):
            raise ConfigError(f"config section '{name}' must be a mapping (in {source})")
        merged.setdefault(name, {}).update(section)
    return merged


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> ErsConfig:
    """Load and validate a config: the embedded defaults, the user's file laid over them, then overrides.

    Parameters
    ----------
    path : str or PathLike, optional
        YAML file with the keys to change (any subset); the embedded defaults alone when omitted.
    overrides : list of str, optional
        ``section.key=value`` strings applied on top of the file.

    Examples
    --------
    >>> cfg = load_config(overrides=["storage.root=/tmp/lake", "embed.batch_size=32"])
    >>> cfg.embed.batch_size
    32
    >>> cfg.embed.device  # not set anywhere but conf/local.yaml
    'auto'
    """
    embedded = embedded_config()
    raw = _read_yaml(embedded, str(embedded))
    source = str(embedded)
    if path is not None:
        source = str(path)
        raw = lay_over(raw, _read_yaml(Path(path), source), source)
    apply_overrides(raw, overrides or [], source)
    return _build(raw, source)
