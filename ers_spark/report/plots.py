"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas (no display, no pyplot state).

``matplotlib.figure.Figure`` is used directly instead of ``pyplot``: no global
backend switch, no figure registry to leak, safe in any process.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from ers_spark.core.projection import fit_pca, project
from ers_spark.report.content import Curve, Histogram, MapSample

RECOGNIZABLE_COLOUR = "#2f6fbf"
UNRECOGNIZABLE_COLOUR = "#e07b14"
UI_MEMBER_COLOUR = "#c4122f"
DPI = 100
# DET axes stop at this error rate: a rate of 0 has no place on a log axis
LOG_FLOOR = 1e-5


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def histogram_png(hist: Histogram) -> bytes:
    """Stacked ERS histogram: recognizable and unrecognizable crops, gamma as a dashed line."""
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    left, widths = hist.edges[:-1], np.diff(hist.edges)
    ax.bar(left, hist.unrecognizable, width=widths, align="edge", color=UNRECOGNIZABLE_COLOUR,
           label=f"unrecognizable (ERS < gamma): {int(hist.unrecognizable.sum())}")
    ax.bar(left, hist.recognizable, width=widths, align="edge", bottom=hist.unrecognizable, color=RECOGNIZABLE_COLOUR,
           label=f"recognizable: {int(hist.recognizable.sum())}")
    ax.axvline(hist.gamma, color="black", linestyle="--", linewidth=1.5, label=f"gamma = {hist.gamma:.4f}")
    ax.set_xlabel("ERS (embedding recognizability score)")
    ax.set_ylabel("crops")
    ax.legend(loc="upper right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return figure_png(fig)


def map_png(sample: MapSample) -> bytes:
    """PCA map of the sampled embeddings: colour = recognizable or not, ring = UI member, X = UI centroid."""
    fig = Figure(figsize=(7, 5.6))
    ax = fig.add_subplot()
    fit = fit_pca(sample.embeddings, 2)
    xy = project(fit, sample.embeddings)
    colours = np.where(sample.recognizable, RECOGNIZABLE_COLOUR, UNRECOGNIZABLE_COLOUR)
    ax.scatter(xy[:, 0], xy[:, 1], s=14, c=colours, alpha=0.75, linewidths=0)
    members = sample.ui_member
    ax.scatter(xy[members, 0], xy[members, 1], s=46, facecolors="none", edgecolors=UI_MEMBER_COLOUR, linewidths=1.0,
               label=f"UI member ({int(members.sum())} in the sample)")
    ax.scatter([], [], s=20, c=RECOGNIZABLE_COLOUR, label=f"recognizable ({int(sample.recognizable.sum())})")
    ax.scatter([], [], s=20, c=UNRECOGNIZABLE_COLOUR, label=f"unrecognizable ({int((~sample.recognizable).sum())})")
    if sample.centroid is not None:
        centre = project(fit, sample.centroid)[0]
        ax.scatter([centre[0]], [centre[1]], marker="X", s=140, c="black", label="UI centroid")
    ratio = fit.explained_ratio
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
    ax.legend(loc="best", frameon=False, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    return figure_png(fig)


def det_png(curves: Sequence[Curve]) -> bytes:
    """DET curves on log axes: x = false accept rate, y = false reject rate, one line per method."""
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for curve in curves:
        ax.plot(np.maximum(curve.x, LOG_FLOOR), np.maximum(curve.y, LOG_FLOOR), label=curve.method, linewidth=1.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FAR (impostor pairs accepted)")
    ax.set_ylabel("FRR (genuine pairs rejected)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(frameon=False)
    return figure_png(fig)


def edc_png(curves: Sequence[Curve]) -> bytes:
    """Error-versus-discard curves: x = share of lowest-quality pairs discarded, y = FNMR at the fixed threshold."""
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for curve in curves:
        ax.plot(curve.x, curve.y, label=curve.method, linewidth=1.6)
    ax.set_xlabel("share of pairs discarded (lowest quality first)")
    ax.set_ylabel("FNMR at the fixed threshold")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    return figure_png(fig)
