"""Small lakes and pages for the report tests: a scored lake from synthetic embeddings with real PNG crops,
evaluate's tables with their schemas, hand-made report content, and an HTML element lister."""

from __future__ import annotations

import io
import json
import shutil
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from ers_spark.core import ers as ers_math
from ers_spark.core.synthetic import vmf_embeddings
from ers_spark.report.content import (
    BANDS, Band, Counts, Crop, Curve, EvalRun, Evaluation, Histogram, MapSample, Metric, QuarantineCount,
    ReportContent, RunSummary, Scoring,
)
from stage_data import T0, write_embeddings, write_uic

GAMMA = 0.5


def crop_png(seed: int, dark: bool) -> bytes:
    """A 40x48 picture, a different colour blob per seed (dark ones for the UI rows)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:40]
    centre = rng.uniform(10, 30, size=2)
    blob = np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / 120.0)[..., None]
    colour = rng.uniform(60, 255, size=3)
    image = (blob * colour + (1 - blob) * 30).astype(np.uint8)
    if dark:
        image = (image * 0.2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_scored_lake(spark, cfg, *, identities: bool, seed: int = 3) -> dict:
    """crops (real PNGs) + embeddings + a UIC, then the real score and clean stages; returns what was written."""
    from ers_spark.lake.contracts import CROPS
    from ers_spark.lake.tables import merge_insert_new
    from ers_spark.stages.clean import run_clean
    from ers_spark.stages.score import run_score

    emb, labels = vmf_embeddings(n_identities=5, per_identity=10, dim=32, ui_share=0.25, seed=seed)
    ids = [f"img{i:03d}" for i in range(len(emb))]
    idents = [f"p{y}" if identities and y >= 0 else None for y in labels]
    write_embeddings(spark, cfg, ids, emb, with_crops=False)
    crops = [
        (i, f"/data/{p or 'unknown'}/{i}.png", p, 40, 48, "png", crop_png(k, y < 0), T0)
        for k, (i, p, y) in enumerate(zip(ids, idents, labels))
    ]
    merge_insert_new(spark, cfg, CROPS, spark.createDataFrame(crops, CROPS.schema))
    members = [ids[k] for k in np.flatnonzero(labels < 0)]
    uic_id = write_uic(spark, cfg, ers_math.ui_centroid(emb[labels < 0]), members)
    score = run_score(spark, cfg)
    clean = run_clean(spark, cfg)
    return {"ids": ids, "members": members, "uic_id": uic_id, "score": score, "clean": clean}


def write_eval_tables(spark, cfg, uic_id: str, *, curve_points: int = 60) -> str:
    """evaluate's three tables with two runs (an older one that must not be shown); returns the newest run_id."""
    from ers_spark.stages.report import EVAL_CURVES, EVAL_METRICS, EVAL_RUNS

    runs = [
        (run_id, T0 + timedelta(minutes=m), "synthetic", uic_id, GAMMA, json.dumps({"seed": 0, "impostor_pairs": 1000}),
         json.dumps({"embeddings": 1, "scores": 1}), "identities")
        for run_id, m in (("eval-old", 0), ("eval-new", 10))
    ]
    metrics = [("eval-old", "verification", "baseline", "tar", "far=1e-2", 0.01, 1)]
    for method, frr in (("baseline", 0.20), ("unsure_as_reject", 0.12), ("sure_only", 0.08)):
        metrics.append(("eval-new", "verification", method, "frr", "far=1e-2", frr, 400))
    metrics.append(("eval-new", "verification", "unsure_as_reject", "unsure_rate", "", 0.1, 400))
    for method, fnir in (("baseline", 0.30), ("ers_rejection", 0.21)):
        metrics.append(("eval-new", "identification", method, "fnir", "fpir=1e-1", fnir, 40))
    for method, tar in (("uniform", 0.70), ("ers", 0.74), ("ers2", 0.77), ("softmax", 0.75), ("topk", 0.72)):
        metrics.append(("eval-new", "set", method, "tar", "far=1e-2", tar, 50))
    for method, pauc in (("ers", 0.031), ("norm", 0.045), ("random", 0.061)):
        metrics.append(("eval-new", "edc", method, "pauc", "discard<=0.5", pauc, 400))
    far = np.logspace(-4, 0, curve_points)
    curves = []
    for method, scale in (("baseline", 0.3), ("unsure_as_reject", 0.2), ("sure_only", 0.15)):
        curves += [("eval-new", "det", method, float(x), float(scale * x ** -0.25 / 10), k) for k, x in enumerate(far)]
    discard = np.linspace(0, 0.5, 11)
    for method, slope in (("ers", 0.35), ("norm", 0.2), ("random", 0.0)):
        fnmr = 0.2 * (1 - slope * discard / 0.5)
        curves += [("eval-new", "edc", method, float(x), float(y), k) for k, (x, y) in enumerate(zip(discard, fnmr))]
    curves.append(("eval-old", "det", "baseline", 0.5, 0.5, 0))
    for contract, rows in ((EVAL_RUNS, runs), (EVAL_METRICS, metrics), (EVAL_CURVES, curves)):
        spark.createDataFrame(rows, contract.schema).write.format("delta").mode("append").save(
            cfg.storage.table_path(contract.name)
        )
    return "eval-new"


def demo_copy_with_eval(spark, cfg, folder: Path):
    """A copy of the demo lake's tables (Delta logs hold relative paths) plus evaluate's tables; its config.

    The shared demo lake stays untouched; no stage runs again.
    """
    target = folder / "lake"
    shutil.copytree(cfg.storage.local_root(), target,
                    ignore=shutil.ignore_patterns("_metastore_db", "_warehouse", "derby.log", "*.html"))
    copy = cfg.with_overrides([f"storage.root={target}"])
    uic_id = spark.read.format("delta").load(copy.storage.table_path("scores")).select("uic_id").first()[0]
    write_eval_tables(spark, copy, uic_id)
    return copy


def sample_content(*, with_evaluation: bool) -> ReportContent:
    """Hand-made content (no Spark) for rendering tests."""
    rng = np.random.default_rng(0)
    crops = [Crop(f"c{k}", ers=k / 10, recognizable=k >= 5, identity="p1" if k % 2 else None,
                  source_path=f"/d/{k}.png", image_bytes=crop_png(k, k < 5)) for k in range(10)]
    emb = rng.normal(size=(30, 8)).astype(np.float32)
    evaluation = None
    if with_evaluation:
        x = np.logspace(-3, 0, 20)
        evaluation = Evaluation(
            run=EvalRun("r1", "2026-01-01 00:00:00", "m", "u1", 0.5, {"seed": 0}, {"scores": 1}, "identities"),
            metrics=[Metric("verification", "baseline", "frr", "far=1e-2", 0.2, 100),
                     Metric("identification", "ers_rejection", "fnir", "fpir=1e-1", 0.25, 10),
                     Metric("set", "ers2", "tar", "far=1e-2", 0.8, 20)],
            curves=[Curve("det", "baseline", x, x[::-1] / 2),
                    Curve("edc", "ers", np.linspace(0, 0.5, 6), np.linspace(0.2, 0.1, 6))],
        )
    return ReportContent(
        title="ers-spark report", generated_at="2026-01-01 00:00 UTC", storage_root="/lake", database="ers",
        scoring=Scoring("m", "1", "u1", 0.5, "identities", "graph", 0.1),
        runs=[RunSummary("score", "r", "2026-01-01 00:00:00", 1.5, {"gamma": 0.5}, {"embeddings": 1}, {"scores": 2},
                         {"scored": 10})],
        table_versions={"crops": 1, "eval_runs": None},
        histogram=Histogram(np.linspace(0, 1, 11), np.array([0] * 5 + [1] * 5), np.array([1] * 5 + [0] * 5), 0.5),
        bands=[Band(name, crops[:3] if name != BANDS[1] else []) for name in BANDS],
        map_sample=MapSample(emb, rng.random(30) > 0.3, rng.random(30) > 0.8, emb[0], 30),
        counts=Counts(10, 10, 10, 5, 5, 3, 5, [QuarantineCount("clean", "unrecognizable", 5)]),
        evaluation=evaluation,
    )


class PageElements(HTMLParser):
    """Every start tag with its attributes, the ids and the <title> text of a page."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.title = ""
        self._in_title = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data

    @property
    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.tags if a.get("id")}

    def images(self) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == "img"]
