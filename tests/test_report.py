"""The HTML report: its pure parts (PCA, thumbnails, metric tables, rendering) and the page over real lakes."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ers_spark.config import load_config
from ers_spark.core.projection import fit_pca, project
from ers_spark.errors import ConfigError
from ers_spark.report.content import BANDS, Metric
from ers_spark.report.images import thumbnail_jpeg
from ers_spark.report.render import render_html
from ers_spark.report.tables import pivot_metrics
from report_lake import GAMMA, PageElements, crop_png, demo_copy_with_eval, sample_content, write_scored_lake

ALWAYS = {"counts", "histogram", "crops", "map", "runs", "evaluation", "quarantine", "version-table",
          *(f"band-{b}" for b in BANDS)}
EVAL_ONLY = {"det", "edc", "metrics-verification", "metrics-identification", "metrics-set", "metrics-edc"}


def cell(html: str, element_id: str) -> str:
    """Text of the element with this id (the count cells hold plain text)."""
    match = re.search(rf'id="{re.escape(element_id)}"[^>]*>([^<]*)<', html)
    assert match, element_id
    return match.group(1).strip()


def section(html: str, element_id: str) -> str:
    """The page from the element with this id to the end of its first table."""
    start = html.index(f'id="{element_id}"')
    return html[start:html.index("</table>", start)]


# ----------------------------------------------------------------------------- pure parts


def test_pca_axes_are_the_top_covariance_eigenvectors() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5)) @ np.diag([5.0, 2.0, 1.0, 0.5, 0.1]) @ np.linalg.qr(rng.normal(size=(5, 5)))[0]
    fit = fit_pca(x, 2)
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    top = vectors[:, ::-1][:, :2].T
    np.testing.assert_allclose(np.abs(np.sum(fit.components * top, axis=1)), 1.0, atol=1e-8)
    np.testing.assert_allclose(fit.explained_ratio, values[::-1][:2] / values.sum(), rtol=1e-8)
    np.testing.assert_allclose(project(fit, x), (x - x.mean(axis=0)) @ fit.components.T)
    pivots = np.abs(fit.components).argmax(axis=1)
    assert (fit.components[[0, 1], pivots] > 0).all()  # sign rule: the same data gives the same picture


def test_pca_of_a_line_is_the_line() -> None:
    x = np.outer(np.arange(5.0), [3.0, 4.0])  # points on the direction (0.6, 0.8)
    fit = fit_pca(x, 1)
    np.testing.assert_allclose(fit.components[0], [0.6, 0.8])
    np.testing.assert_allclose(project(fit, x)[:, 0], (np.arange(5.0) - 2) * 5)
    with pytest.raises(ValueError, match="at least 2 rows"):
        fit_pca(x[:1], 1)


def test_thumbnail_bounds_the_longer_side_and_says_when_bytes_are_no_image() -> None:
    jpeg = thumbnail_jpeg(crop_png(0, dark=False), 24)  # 40x48 -> 20x24
    assert Image.open(io.BytesIO(jpeg)).size == (20, 24)
    enlarged = Image.open(io.BytesIO(thumbnail_jpeg(crop_png(0, dark=False), 96))).size
    assert max(enlarged) == 96  # small crops are shown enlarged
    assert thumbnail_jpeg(b"<html>not an image</html>", 24) is None


def test_metric_tables_pivot_methods_into_rows_in_the_papers_order() -> None:
    metrics = [
        Metric("set", "uniform", "tar", "far=1e-2", 0.70, 50),
        Metric("set", "ers2", "tar", "far=1e-2", 0.77123, 50),
        Metric("set", "ers2", "tar", "far=1e-3", 0.5, 50),
        Metric("identification", "baseline", "fnir", "fpir=1e-1", 0.3, 40),
    ]
    table = pivot_metrics(metrics, "set")
    assert table.columns == ["tar @ far=1e-2", "tar @ far=1e-3"]
    assert [method for method, _ in table.rows] == ["uniform", "ers2"]
    assert [c.text for c in table.rows[1][1]] == ["0.7712", "0.5"]
    assert [c.text for c in table.rows[0][1]] == ["0.7", ""]  # uniform has no far=1e-3 value
    assert pivot_metrics(metrics, "edc") is None


def test_page_is_self_contained_with_or_without_evaluation() -> None:
    for with_evaluation in (False, True):
        html = render_html(sample_content(with_evaluation=with_evaluation), thumbnail_px=48, thumbnails_per_band=3)
        page = PageElements(html)
        assert page.title == "ers-spark report"
        assert ALWAYS <= page.ids
        inline = ("data:image/png;base64,", "data:image/jpeg;base64,")
        assert all(img["src"].startswith(inline) for img in page.images())
        assert not [a for t, a in page.tags if t in ("script", "link") or (a.get("src") or "").startswith("http")]
        expected_eval = {"det", "edc", "metrics-verification", "metrics-identification", "metrics-set"}
        assert (expected_eval <= page.ids) if with_evaluation else not (EVAL_ONLY & page.ids)
        assert ("no-evaluation" in page.ids) != with_evaluation


def test_report_path_defaults_under_the_root_local_or_in_the_store(tmp_path) -> None:
    cfg = load_config(overrides=[f"storage.root={tmp_path}"])
    assert cfg.report.output_path(cfg.storage) == str(tmp_path.resolve() / "report.html")
    chosen = load_config(overrides=[f"report.path={tmp_path / 'r.html'}", "storage.root=s3a://bucket/lake"])
    assert chosen.report.output_path(chosen.storage) == str(tmp_path.resolve() / "r.html")
    named = load_config(overrides=[f"report.path=file://{tmp_path / 'r.html'}", "storage.root=s3a://bucket/lake"])
    assert named.report.output_path(named.storage) == str(tmp_path.resolve() / "r.html")
    remote = load_config(overrides=["storage.root=s3a://bucket/lake"])
    assert remote.report.output_path(remote.storage) == "s3a://bucket/lake/report.html"
    with pytest.raises(ConfigError, match="report.thumbnail_px"):
        load_config(overrides=["report.thumbnail_px=0"])


# ----------------------------------------------------------------------------- over real lakes


def _table(spark, cfg, name):
    return spark.read.format("delta").load(cfg.storage.table_path(name))


def _assert_counts_match_tables(spark, cfg, html: str) -> None:
    from pyspark.sql import functions as F

    scores = _table(spark, cfg, "scores")
    assert int(cell(html, "count-crops")) == _table(spark, cfg, "crops").count()
    assert int(cell(html, "count-embeddings")) == _table(spark, cfg, "embeddings").count()
    assert int(cell(html, "count-scored")) == scores.count()
    assert int(cell(html, "count-unrecognizable")) == scores.where(~F.col("recognizable")).count()
    assert int(cell(html, "count-recognizable")) == scores.where(F.col("recognizable")).count()
    assert int(cell(html, "count-ui-members")) == _table(spark, cfg, "ui_members").count()
    assert int(cell(html, "count-cleaned")) == _table(spark, cfg, "cleaned").count()
    quarantine = _table(spark, cfg, "quarantine")
    assert int(cell(html, "count-quarantined")) == quarantine.count()
    table = section(html, "quarantine")
    for row in quarantine.groupBy("stage", "reason").count().collect():
        assert f"<td>{row['stage']}</td><td>{row['reason']}</td><td class=\"num\">{row['count']}</td>" in table


@pytest.mark.spark
def test_demo_report_shows_every_section_and_the_tables_counts(spark, demo_lake, demo_first_run) -> None:
    """The report `ers-spark demo` wrote into its lake (the path its run record and its last line give)."""
    cfg, records = demo_lake
    record = demo_first_run["report"]
    assert record["path"] == str(Path(cfg.storage.root) / "report.html")
    assert f"Open the report:      {Path(record['path']).as_uri()}" in demo_first_run["stdout"]
    html = Path(record["path"]).read_text()
    page = PageElements(html)
    assert ALWAYS <= page.ids and "no-evaluation" in page.ids and not (EVAL_ONLY & page.ids)
    _assert_counts_match_tables(spark, cfg, html)
    score = next(r for r in records if r["stage"] == "score")
    assert f"{score['params']['gamma']:.4f}" in html and score["params"]["uic_id"] in html
    crops = [img for img in page.images() if (img.get("alt") or "").startswith("crop ")]
    per_band = cfg.report.thumbnails_per_band
    assert len(crops) == record["counts"]["thumbnails"] == 3 * per_band  # lowest, highest, and per_band around gamma
    assert record["counts"]["map_points"] == min(cfg.report.map_sample_rows, int(cell(html, "count-scored")))
    for stage in ("ingest", "embed", "locate-ui", "score", "clean"):
        assert f"<td>{stage}</td>" in html  # its newest run, with parameters and versions


@pytest.mark.spark
def test_report_without_identities_or_evaluate_through_the_cli(spark, make_cfg, tmp_path, capsys) -> None:
    """A user without identities: `ers-spark report` still draws the histogram, crops, map and counts."""
    from ers_spark.cli import main

    cfg = make_cfg(f"score.gamma={GAMMA}", "clean.label_noise=false")
    lake = write_scored_lake(spark, cfg, identities=False)
    capsys.readouterr()
    overrides = [f"storage.root={cfg.storage.root}", f"storage.database={cfg.storage.database}",
                 "spark.shuffle_partitions=2", "report.thumbnails_per_band=4", "report.map_sample_rows=30"]
    assert main(["report", *overrides]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    html = (tmp_path / "lake" / "report.html").read_text()
    assert record["path"] == str((tmp_path / "lake" / "report.html").resolve())
    page = PageElements(html)
    assert ALWAYS <= page.ids and "no-evaluation" in page.ids and not (EVAL_ONLY & page.ids)
    assert 'alt="ERS histogram' in html and 'alt="PCA map' in html
    assert record["counts"]["map_points"] == 30 and record["counts"]["thumbnails"] == 12
    assert len([i for i in page.images() if (i.get("alt") or "").startswith("crop ")]) == 12
    assert "cannot decode" not in html
    _assert_counts_match_tables(spark, cfg, html)
    assert int(cell(html, "count-ui-members")) == len(lake["members"])


@pytest.mark.spark
def test_report_draws_the_newest_evaluate_run(spark, demo_lake, tmp_path) -> None:
    from ers_spark.stages.report import run_report

    cfg = demo_copy_with_eval(spark, demo_lake[0], tmp_path).with_overrides(
        [f"report.path={tmp_path / 'eval.html'}", "report.curve_points=20"]
    )
    newest = "eval-new"
    record = run_report(spark, cfg)
    html = (tmp_path / "eval.html").read_text()
    page = PageElements(html)
    assert ALWAYS | EVAL_ONLY <= page.ids and "no-evaluation" not in page.ids
    assert f"<code>{newest}</code>" in html and "eval-old" not in html
    identification = section(html, "metrics-identification")
    assert "<td>ers_rejection</td>" in identification and "0.21" in identification
    pooling = section(html, "metrics-set")
    for method in ("uniform", "ers", "ers2", "softmax", "topk"):
        assert f"<td>{method}</td>" in pooling
    assert record["counts"]["eval_curves"] == 6  # 3 DET + 3 EDC lines of the newest run
    assert record["counts"]["eval_metrics"] == 14


@pytest.mark.spark
def test_thinned_curves_keep_first_last_and_at_most_the_cap(spark) -> None:
    from ers_spark.stages.report import EVAL_CURVES, thinned_curves

    rows = [("r", "det", "a", float(k), 0.0, k) for k in range(1000)]
    rows += [("r", "edc", "b", 0.0, 0.0, k) for k in range(7)]
    thinned = thinned_curves(spark.createDataFrame(rows, EVAL_CURVES.schema), 100).collect()
    det = sorted(r["point_index"] for r in thinned if r["curve"] == "det")
    assert det[0] == 0 and det[-1] == 999 and len(det) <= 101 and det[:3] == [0, 10, 20]
    assert sorted(r["point_index"] for r in thinned if r["curve"] == "edc") == list(range(7))


@pytest.mark.spark
def test_report_without_scores_is_a_one_line_error(make_cfg, capsys) -> None:
    from ers_spark.cli import main

    cfg = make_cfg()
    assert main(["report", f"storage.root={cfg.storage.root}", f"storage.database={cfg.storage.database}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: input table 'scores' not found") and "run `ers-spark score` first" in err
