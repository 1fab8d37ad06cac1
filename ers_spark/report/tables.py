"""Metric rows of ``eval_metrics`` pivoted into the page's tables: one row per method, one column per metric."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ers_spark.report.content import Metric

# the paper's reading order; methods not listed follow alphabetically
METHOD_ORDER = ("baseline", "unsure_as_reject", "sure_only", "ers_rejection",
                "uniform", "ers", "ers2", "softmax", "topk", "norm", "random")
METRIC_ORDER = ("tar", "frr", "far", "fnir", "unsure_rate", "pauc")


@dataclass(frozen=True)
class Cell:
    text: str
    count: int | None


@dataclass(frozen=True)
class MetricTable:
    protocol: str
    columns: list[str]
    rows: list[tuple[str, list[Cell]]]


def _rank(order: Sequence[str], name: str) -> tuple[int, str]:
    return (order.index(name), "") if name in order else (len(order), name)


def column_name(metric: str, operating_point: str) -> str:
    return f"{metric} @ {operating_point}" if operating_point else metric


def format_value(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}"


def pivot_metrics(metrics: Sequence[Metric], protocol: str) -> MetricTable | None:
    """The table of one protocol, or None when the run wrote no metric for it."""
    chosen = [m for m in metrics if m.protocol == protocol]
    if not chosen:
        return None
    keys = sorted({(m.metric, m.operating_point) for m in chosen}, key=lambda k: (_rank(METRIC_ORDER, k[0]), k[1]))
    methods = sorted({m.method for m in chosen}, key=lambda name: _rank(METHOD_ORDER, name))
    by_cell = {(m.method, m.metric, m.operating_point): m for m in chosen}
    rows = []
    for method in methods:
        cells = []
        for metric, point in keys:
            found = by_cell.get((method, metric, point))
            cells.append(Cell(format_value(found.value), found.count) if found else Cell("", None))
        rows.append((method, cells))
    return MetricTable(protocol=protocol, columns=[column_name(*k) for k in keys], rows=rows)
