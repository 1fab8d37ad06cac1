"""Report content -> one self-contained HTML page (figures and thumbnails inlined as data URIs)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import jinja2

from ers_spark.report import plots
from ers_spark.report.content import Crop, Curve, Evaluation, ReportContent
from ers_spark.report.images import data_uri, thumbnail_jpeg
from ers_spark.report.tables import MetricTable, pivot_metrics
from ers_spark.report.template import DET_HOW_TO_READ, EDC_HOW_TO_READ, PAGE

PROTOCOL_TITLES = {
    "verification": "1:1 verification",
    "identification": "1:N open-set identification",
    "set": "Set-based verification (template pooling)",
    "edc": "Error versus discard: partial areas",
}
MIN_MAP_POINTS = 3


@dataclass(frozen=True)
class ThumbCell:
    crop: Crop
    uri: str | None
    tooltip: str


@dataclass(frozen=True)
class BandView:
    name: str
    title: str
    cells: list[ThumbCell]


def _thumb_cells(crops: list[Crop], thumbnail_px: int) -> list[ThumbCell]:
    cells = []
    for crop in crops:
        jpeg = thumbnail_jpeg(crop.image_bytes, thumbnail_px) if crop.image_bytes is not None else None
        tooltip = f"{crop.source_path or crop.image_id} · ERS {crop.ers:.4f}"
        cells.append(ThumbCell(crop, data_uri(jpeg, "image/jpeg") if jpeg is not None else None, tooltip))
    return cells


def _curves(evaluation: Evaluation | None, kind: str) -> list[Curve]:
    return [c for c in evaluation.curves if c.curve == kind and len(c.x)] if evaluation else []


def _metric_tables(evaluation: Evaluation | None) -> list[MetricTable]:
    if evaluation is None:
        return []
    tables = (pivot_metrics(evaluation.metrics, protocol) for protocol in PROTOCOL_TITLES)
    return [t for t in tables if t is not None]


def _eval_params_json(evaluation: Evaluation | None) -> str:
    if evaluation is None:
        return ""
    run = evaluation.run
    shown = {"params": run.params, "input_versions": run.input_versions}
    return json.dumps(shown, indent=1, sort_keys=True, default=str)


def render_html(content: ReportContent, *, thumbnail_px: int, thumbnails_per_band: int) -> str:
    """The page: every figure drawn here, every image inlined, no external reference."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    sample = content.map_sample
    has_map = len(sample.embeddings) >= MIN_MAP_POINTS
    det, edc = _curves(content.evaluation, "det"), _curves(content.evaluation, "edc")
    return env.from_string(PAGE).render(
        c=content,
        s=content.scoring,
        n=content.counts,
        e=content.evaluation,
        thumbnail_px=thumbnail_px,
        thumbnails_per_band=thumbnails_per_band,
        histogram_uri=data_uri(plots.histogram_png(content.histogram), "image/png"),
        bands=[BandView(b.name, b.title, _thumb_cells(b.crops, thumbnail_px)) for b in content.bands],
        map_uri=data_uri(plots.map_png(sample), "image/png") if has_map else None,
        map_points=len(sample.embeddings),
        map_total=sample.total_rows,
        det_uri=data_uri(plots.det_png(det), "image/png") if det else None,
        edc_uri=data_uri(plots.edc_png(edc), "image/png") if edc else None,
        det_how_to_read=DET_HOW_TO_READ,
        edc_how_to_read=EDC_HOW_TO_READ,
        metric_tables=_metric_tables(content.evaluation),
        protocol_titles=PROTOCOL_TITLES,
        eval_params_json=_eval_params_json(content.evaluation),
    )
