"""Quality benchmark: does ERS separate clean faces from degraded copies, and does gamma quarantine the right ones?

    python bench/quality.py [--out bench/results/quality.json]

Data: the shared ORL crops (../shared/data/orl_faces, 92x112 grey) as they are, plus one heavily
degraded copy of each crop (blur, 6-10 px resolution, darkness, occlusion, motion blur, noise in turn).
Both keep the person's label. The whole pipeline runs on local[2] with the defaults' embedding (the
dlib spec's alignment: every crop cut into a 150 px dlib chip in the embed pass, a centred resize
where no face is found): ingest -> embed -> locate-ui -> score -> clean. Reported: AUC of ERS and of the raw embedding norm (the free baseline) for clean
vs degraded, gamma, and the share of degraded / clean crops that gamma quarantines, for gamma
calibrated with identity labels (the default when labels exist) and without labels.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import run_provenance, write_result  # noqa: E402  (bench/, beside this script)

from ers_spark.core.calibration import calibrate_gamma_unlabelled  # noqa: E402
from ers_spark.core.metrics import roc_auc  # noqa: E402
from ers_spark.config import load_config  # noqa: E402
from ers_spark.lake.contracts import CROPS, EMBEDDINGS, SCORES, UI_CENTROIDS, UI_MEMBERS  # noqa: E402
from ers_spark.stages.embed import run_embed  # noqa: E402
from ers_spark.stages.ingest import run_ingest  # noqa: E402
from ers_spark.lake.tables import table_path  # noqa: E402
from ers_spark.runtime.session import build_session  # noqa: E402
from ers_spark.core.synthetic import DEGRADATIONS, degrade  # noqa: E402

ORL = ROOT.parent / "shared" / "data" / "orl_faces"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def orl_with_degraded_copies(seed: int = 0) -> pd.DataFrame:
    """Rows (path, identity, bytes, degraded) for every ORL crop, as it is, and one degraded copy of it."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, path in enumerate(sorted(ORL.glob("s*/*.pgm"), key=lambda p: (int(p.parent.name[1:]), int(p.stem)))):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        kind = DEGRADATIONS[k % len(DEGRADATIONS)]
        person = path.parent.name
        rows.append((f"orl/{person}/{path.stem}.png", person, _png(rgb), False, "clean"))
        rows.append((f"orl_degraded/{person}/{path.stem}_{kind}.png", person, _png(degrade(rgb, kind, rng)), True, kind))
    return pd.DataFrame(rows, columns=["path", "identity", "bytes", "degraded", "kind"])


def evaluate(scores: pd.DataFrame, gamma: float) -> dict:
    degraded = scores["degraded"].to_numpy(bool)
    ers = scores["ers"].to_numpy()
    return {
        "gamma": round(float(gamma), 4),
        "quarantined_share_degraded": round(float(np.mean(ers[degraded] < gamma)), 4),
        "quarantined_share_clean": round(float(np.mean(ers[~degraded] < gamma)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    parser.add_argument("--dominance-ratio", type=float, default=3.0)
    parser.add_argument("--eps", type=float, default=None, help="fixed cosine distance cut (default: the grid)")
    args = parser.parse_args()
    if not ORL.is_dir():
        raise SystemExit(f"quality bench needs the shared ORL faces at {ORL}")

    work = Path(tempfile.mkdtemp(prefix="ers-bench-quality-"))
    t0 = time.perf_counter()
    data = orl_with_degraded_copies()
    data[["path", "identity", "bytes"]].to_parquet(work / "in.parquet")
    overrides = [
        f"storage.root={work / 'lake'}",
        "spark.master=local[2]",
        "spark.shuffle_partitions=4",
        f"spark.checkpoint_dir={work / 'ckpt'}",
        "spark.hive_metastore=false",
        f"ingest.input_path={work / 'in.parquet'}",
        "ingest.input_format=parquet",
        "ingest.identity_column=identity",
        f"locate_ui.dominance_ratio={args.dominance_ratio}",
        "locate_ui.kmeans_cells=4",
        "locate_ui.nprobe=2",
    ]
    if args.eps is not None:
        overrides.append(f"locate_ui.eps={args.eps}")
    cfg = load_config(overrides=overrides)
    spark = build_session(cfg, "bench-quality")
    from ers_spark.stages.clean import run_clean
    from ers_spark.stages.locate_ui import run_locate_ui
    from ers_spark.stages.score import run_score

    run_ingest(spark, cfg)
    embed_record = run_embed(spark, cfg)
    ui = run_locate_ui(spark, cfg)
    score_record = run_score(spark, cfg)
    clean_record = run_clean(spark, cfg)

    crops = spark.read.format("delta").load(table_path(cfg, CROPS)).select("image_id", "source_path").toPandas()
    emb = spark.read.format("delta").load(table_path(cfg, EMBEDDINGS)).select("image_id", "raw_norm", "embedding").toPandas()
    scores = spark.read.format("delta").load(table_path(cfg, SCORES)).select("image_id", "ers").toPandas()
    centroid = spark.read.format("delta").load(table_path(cfg, UI_CENTROIDS)).orderBy("created_at").toPandas().iloc[-1]
    members = set(spark.read.format("delta").load(table_path(cfg, UI_MEMBERS)).where(f"uic_id = '{centroid.uic_id}'").toPandas().image_id)
    table = (
        crops.merge(emb, on="image_id").merge(scores, on="image_id")
        .merge(data[["path", "degraded", "kind"]].rename(columns={"path": "source_path"}), on="source_path")
    )
    degraded = table["degraded"].to_numpy(bool)
    gamma_labelled = float(score_record["params"]["gamma"])
    is_member = table["image_id"].isin(members).to_numpy()
    unlabelled = calibrate_gamma_unlabelled(table["ers"].to_numpy()[is_member], table["ers"].to_numpy()[~is_member])

    result = {
        **run_provenance(),
        "images": int(len(table)),
        "clean": int((~degraded).sum()),
        "degraded": int(degraded.sum()),
        "model": f"{emb.shape[0]} embeddings, dlib_resnet_v1",
        "model_version": embed_record["params"]["model_version"],
        "embed_counts": embed_record["counts"],
        "auc_ers_clean_vs_degraded": round(roc_auc(table["ers"].to_numpy(), ~degraded), 4),
        "auc_norm_clean_vs_degraded": round(roc_auc(table["raw_norm"].to_numpy(), ~degraded), 4),
        **evaluate(table, gamma_labelled),
        "gamma_method": score_record["params"]["gamma_method"],
        "unlabelled_calibration": evaluate(table, unlabelled.gamma),
        "ui_members": int(is_member.sum()),
        "ui_purity": round(float(degraded[is_member].mean()) if is_member.any() else float("nan"), 4),
        "eps": ui["params"].get("eps_used") if isinstance(ui.get("params"), dict) else None,
        "settings_not_default": {"locate_ui.dominance_ratio": args.dominance_ratio, "locate_ui.kmeans_cells": 4,
                                 "locate_ui.nprobe": 2, "locate_ui.eps": args.eps},
        "ers_median_clean": round(float(np.median(table["ers"][~degraded])), 4),
        "ers_median_degraded": round(float(np.median(table["ers"][degraded])), 4),
        "auc_ers_by_degradation": {
            kind: round(roc_auc(
                np.concatenate([table["ers"][~degraded], table["ers"][table["kind"] == kind]]),
                np.concatenate([np.ones((~degraded).sum(), bool), np.zeros((table["kind"] == kind).sum(), bool)]),
            ), 4)
            for kind in DEGRADATIONS
        },
        "clean_counts": clean_record["counts"],
        "targets": {"auc": ">= 0.9", "quarantined_share_degraded": ">= 0.8", "quarantined_share_clean": "<= 0.1"},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result["targets_met"] = {
        "auc >= 0.9": result["auc_ers_clean_vs_degraded"] >= 0.9,
        "quarantined_share_degraded >= 0.8": result["quarantined_share_degraded"] >= 0.8,
        "quarantined_share_clean <= 0.1": result["quarantined_share_clean"] <= 0.1,
    }
    write_result(args.out, result)
    spark.stop()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
