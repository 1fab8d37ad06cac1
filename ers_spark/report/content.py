"""What a report shows, as plain values: the Spark side fills these, the renderer draws them.

Everything here is small by construction (capped samples, aggregates), so the
renderer never needs Spark and can be tested on hand-made content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

BAND_LOWEST = "lowest"
BAND_BELOW_GAMMA = "below_gamma"
BAND_ABOVE_GAMMA = "above_gamma"
BAND_HIGHEST = "highest"
BANDS = (BAND_LOWEST, BAND_BELOW_GAMMA, BAND_ABOVE_GAMMA, BAND_HIGHEST)
BAND_TITLES = {
    BAND_LOWEST: "Lowest ERS (most unrecognizable)",
    BAND_BELOW_GAMMA: "Just below gamma (rejected)",
    BAND_ABOVE_GAMMA: "Just above gamma (kept)",
    BAND_HIGHEST: "Highest ERS (most recognizable)",
}


@dataclass(frozen=True)
class RunSummary:
    """The latest run of one stage, from the ``runs`` table."""

    stage: str
    run_id: str
    started_at: str
    seconds: float
    params: dict[str, Any]
    input_versions: dict[str, int | None]
    output_versions: dict[str, int | None]
    counts: dict[str, int]


@dataclass(frozen=True)
class Scoring:
    """Which scores the report is about: one model and one UIC, with its gamma."""

    model_name: str
    model_version: str
    uic_id: str
    gamma: float
    gamma_method: str | None
    uic_method: str | None
    eps: float | None


@dataclass(frozen=True)
class Histogram:
    """ERS counts per bin (``edges`` has one more entry than each count array)."""

    edges: npt.NDArray[np.float64]
    recognizable: npt.NDArray[np.int64]
    unrecognizable: npt.NDArray[np.int64]
    gamma: float


@dataclass(frozen=True)
class Crop:
    """One crop shown in the thumbnail grid."""

    image_id: str
    ers: float
    recognizable: bool
    identity: str | None
    source_path: str | None
    image_bytes: bytes | None  # None: an imported vector, no image in the lake


@dataclass(frozen=True)
class Band:
    """Crops of one ERS band, in ERS order."""

    name: str
    crops: list[Crop]

    @property
    def title(self) -> str:
        return BAND_TITLES[self.name]


@dataclass(frozen=True)
class MapSample:
    """A capped sample of embeddings for the 2-D map, with what each point is."""

    embeddings: npt.NDArray[np.float32]
    recognizable: npt.NDArray[np.bool_]
    ui_member: npt.NDArray[np.bool_]
    centroid: npt.NDArray[np.float32] | None
    total_rows: int


@dataclass(frozen=True)
class QuarantineCount:
    stage: str
    reason: str
    rows: int


@dataclass(frozen=True)
class Counts:
    """Row counts of the tables for the report's model and UIC (None: the table does not exist)."""

    crops: int
    embeddings: int
    scored: int
    recognizable: int
    unrecognizable: int
    ui_members: int
    cleaned: int | None
    quarantine: list[QuarantineCount] = field(default_factory=list)

    @property
    def quarantined(self) -> int:
        return sum(q.rows for q in self.quarantine)


@dataclass(frozen=True)
class EvalRun:
    """One row of ``eval_runs``."""

    run_id: str
    started_at: str
    model: str
    uic_id: str
    gamma: float | None
    params: dict[str, Any]
    input_versions: dict[str, Any]
    pairs_source: str | None


@dataclass(frozen=True)
class Metric:
    """One row of ``eval_metrics``."""

    protocol: str
    method: str
    metric: str
    operating_point: str
    value: float | None
    count: int | None


@dataclass(frozen=True)
class Curve:
    """The points of one curve of ``eval_curves`` (one curve kind, one method), in point order."""

    curve: str
    method: str
    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]


@dataclass(frozen=True)
class Evaluation:
    """The newest ``evaluate`` run: its row, metrics and curves."""

    run: EvalRun
    metrics: list[Metric]
    curves: list[Curve]


@dataclass(frozen=True)
class ReportContent:
    """Everything one report page shows."""

    title: str
    generated_at: str
    storage_root: str
    database: str
    scoring: Scoring
    runs: list[RunSummary]
    table_versions: dict[str, int | None]
    histogram: Histogram
    bands: list[Band]
    map_sample: MapSample
    counts: Counts
    evaluation: Evaluation | None
