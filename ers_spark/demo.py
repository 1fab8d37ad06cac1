"""``ers-spark demo``: a small, offline demo dataset from images scikit-image ships, run through the pipeline.

The dataset mixes recognizable faces (crops of scikit-image's astronaut photo,
identity ``astronaut``; 100 small LFW faces), unrecognizable images (heavily
degraded astronaut crops, 100 LFW non-face patches, scenes such as coffee,
rocket and camera) so that the unrecognizable-identity cluster has something
to gather. It is written as a Parquet table of image bytes with an identity
column, which the ingest stage reads like any user's Parquet input.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from ers_spark.config import ErsConfig
from ers_spark.pipeline import run_pipeline

DEMO_HOME = "~/.ers-spark/demo"
# the astronaut's face in skimage.data.astronaut() (found once with dlib's HOG detector)
ASTRONAUT_FACE_BOX = (140, 40, 300, 200)  # left, top, right, bottom with a margin
SCENES = ("coffee", "chelsea", "rocket", "camera", "coins", "brick", "grass", "gravel", "moon", "text", "horse", "page")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _to_pil(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.shape[2] == 4:
        array = array[:, :, :3]
    return Image.fromarray(array, mode="RGB")


def demo_records(seed: int = 0) -> pd.DataFrame:
    """The demo images as rows (path, identity, bytes, kind); deterministic for a seed."""
    import skimage.data as data

    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str | None, bytes, str]] = []
    astronaut = _to_pil(data.astronaut())
    left, top, right, bottom = ASTRONAUT_FACE_BOX
    for i, (dx, dy) in enumerate([(0, 0), (-8, 0), (8, 0), (0, -8), (0, 8), (-6, -6), (6, 6), (4, -4)]):
        crop = astronaut.crop((left + dx, top + dy, right + dx, bottom + dy))
        if i % 2 == 1:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        rows.append((f"demo/astronaut/{i}.png", "astronaut", _png(crop), "face"))
        degraded = _degrade(crop, i, rng)
        rows.append((f"demo/degraded/astronaut_{i}.png", None, _png(degraded), "degraded"))
    lfw = data.lfw_subset()  # 100 faces then 100 non-faces, 25x25 grey
    for i in range(100):
        rows.append((f"demo/lfw_faces/{i}.png", None, _png(_to_pil(lfw[i]).resize((100, 100))), "face"))
        rows.append((f"demo/non_faces/{i}.png", None, _png(_to_pil(lfw[100 + i]).resize((100, 100))), "non_face"))
    for name in SCENES:
        rows.append((f"demo/scenes/{name}.png", None, _png(_to_pil(getattr(data, name)()).resize((150, 150))), "non_face"))
    return pd.DataFrame(rows, columns=["path", "identity", "bytes", "kind"])


def _degrade(image: Image.Image, i: int, rng: np.random.Generator) -> Image.Image:
    kind = i % 4
    if kind == 0:
        return image.filter(ImageFilter.GaussianBlur(radius=12))
    if kind == 1:
        size = int(rng.integers(6, 11))
        return image.resize((size, size), Image.Resampling.BILINEAR).resize(image.size, Image.Resampling.BILINEAR)
    if kind == 2:
        return Image.fromarray((np.asarray(image, dtype=np.float32) * 0.06).astype(np.uint8))
    occluded = np.asarray(image).copy()
    occluded[: int(occluded.shape[0] * 0.8)] = 0
    return Image.fromarray(occluded)


def write_demo_input(folder: Path) -> Path:
    """Write the demo Parquet table (path, identity, bytes) into ``folder`` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "demo_images.parquet"
    demo_records().drop(columns=["kind"]).to_parquet(table, index=False)
    return table


def demo_settings(home: Path) -> list[str]:
    """The demo's own settings for its folder ``home``: its lake, checkpoints and Parquet input there.

    >>> demo_settings(Path("/h"))[:2]
    ['storage.root=/h/lake', 'ingest.input_path=/h/input/demo_images.parquet']
    """
    return [
        f"storage.root={home / 'lake'}",
        f"ingest.input_path={home / 'input' / 'demo_images.parquet'}",
        "ingest.input_format=parquet",
        "ingest.path_column=path",
        "ingest.identity_column=identity",
        f"spark.checkpoint_dir={home / 'checkpoints'}",
    ]


def demo_overrides(user_overrides: list[str]) -> list[str]:
    """Demo settings first (its own lake and input), the user's overrides after them (they win)."""
    home = Path(os.path.expanduser(DEMO_HOME))
    write_demo_input(home / "input")
    return demo_settings(home) + list(user_overrides)


def demo_summary(spark, cfg: ErsConfig, records: list[dict]) -> str:
    """The human summary the demo ends with: crops, unrecognizable crops, the UIC, gamma, where the tables are.

    Reads the tables the run left (small) and the score stage's record (which UIC and gamma it used).
    """
    from pyspark.sql import functions as F

    from ers_spark.lake.contracts import CLEANED, CROPS, MEMBER_COUNT, RECOGNIZABLE, SCORES, UI_CENTROIDS, UIC_ID
    from ers_spark.lake.tables import read_table

    def load(contract):
        return read_table(spark, cfg, contract)

    score = next((r for r in reversed(records) if r.get("stage") == "score"), {})
    uic_id, gamma = score.get("params", {}).get("uic_id"), score.get("params", {}).get("gamma")
    gamma_method = score.get("params", {}).get("gamma_method")
    crops = load(CROPS).count()
    scores = load(SCORES)
    if uic_id is not None:
        scores = scores.where(F.col(UIC_ID) == uic_id)
    scored = scores.count()
    unrecognizable = scores.where(~F.col(RECOGNIZABLE)).count()
    members = None
    if uic_id is not None:
        row = load(UI_CENTROIDS).where(F.col(UIC_ID) == uic_id).select(MEMBER_COUNT).first()
        members = row[0] if row is not None else None
    cleaned = load(CLEANED).count()
    root = cfg.storage.table_path("").rstrip("/")
    share = f" ({unrecognizable / scored:.0%} of {scored} scored)" if scored else ""
    lines = [
        "",
        "ers-spark demo: summary",
        f"  crops:            {crops}",
        f"  embedded:         {embedded_line(records)}",
        f"  unrecognizable:   {unrecognizable}{share}",
        f"  UIC:              {uic_id} ({members} members)",
        f"  gamma:            {gamma:.4f} ({gamma_method})" if isinstance(gamma, (int, float)) else f"  gamma:            {gamma}",
        f"  cleaned:          {cleaned}",
        f"  tables:           {root}/<table> (catalog database `{cfg.storage.database}`)",
        "Read one from Python:  spark.read.format('delta').load('" + cfg.storage.table_path("crops") + "')",
        "Query them with SQL:   ers-spark sql \"SELECT identity, count(*) FROM ers.crops GROUP BY identity\" "
        f"storage.root={cfg.storage.root}",
    ]
    return "\n".join(lines)


def embedded_line(records: list[dict]) -> str:
    """How the crops reached the model: as aligned chips (the spec's alignment), or resized as they are.

    >>> embedded_line([{"stage": "embed", "counts": {"written": 5, "aligned": 4, "embedded_unaligned": 1},
    ...                 "params": {"alignment": {"method": "dlib_chip", "padding": 0.25}}}])
    '5, aligned as the model was trained (dlib_chip, padding 0.25): 4 chips of a detected face, 1 resized as is (no face found)'
    >>> embedded_line([{"stage": "embed", "counts": {"written": 5}, "params": {"alignment": None}}])
    '5, resized as they are (embed.align=false)'
    """
    embed = next((r for r in reversed(records) if r.get("stage") == "embed"), {})
    counts, alignment = embed.get("counts", {}), embed.get("params", {}).get("alignment")
    written = counts.get("written", 0)
    if not alignment:
        return f"{written}, resized as they are (embed.align=false)"
    how = alignment["method"] + (f", padding {alignment['padding']:g}" if alignment["method"] == "dlib_chip" else "")
    return (f"{written}, aligned as the model was trained ({how}): {counts.get('aligned', 0)} chips of a detected face, {counts.get('embedded_unaligned', 0)} resized "
            "as is (no face found)")


def report_link(path: str) -> str:
    """Where to open the report: a ``file://`` URI for a local file, the store's URI as it is.

    >>> report_link("/tmp/lake/report.html"), report_link("s3a://bucket/lake/report.html")
    ('file:///tmp/lake/report.html', 's3a://bucket/lake/report.html')
    """
    from ers_spark.runtime.cluster_paths import is_local_path

    if not is_local_path(path):
        return path
    return Path(path.removeprefix("file:")).expanduser().resolve().as_uri()


def run_demo(cfg: ErsConfig) -> None:
    """Run every pipeline stage on the demo input, write the HTML report, end with a summary and the report's path."""
    from pyspark.sql import SparkSession

    from ers_spark.stages.report import run_report

    records = run_pipeline(cfg)
    spark = SparkSession.getActiveSession()
    report = run_report(spark, cfg)
    print(demo_summary(spark, cfg, records), flush=True)
    print(f"Open the report:      {report_link(report['path'])}", flush=True)
