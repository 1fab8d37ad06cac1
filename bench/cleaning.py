"""Cleaning benchmark: does the clean stage catch swapped labels, spare correct ones, and quarantine unrecognizable copies?

    python bench/cleaning.py [--out bench/results/cleaning.json]

Data (built in code, nothing copied): the shared ORL crops as they are (400 grey 92x112, 40 people)
plus the 25 deepface photos labelled in its master.csv (9 people, identities from its "Yes"
pairs; shrunk to 400 px on the long side). 5 % of these images (seeded) get the label of another identity; each image also gets one
heavily degraded copy (blur, 6-10 px resolution, darkness, occlusion, motion blur, noise in turn)
with its true label. The project's own stages run on local[2]: ingest -> embed -> locate-ui ->
score -> clean, once with the defaults (``embed.align: auto``: the dlib spec's chips cut in the embed pass,
small crops enlarged, centred resize where no face is found) and once with ``embed.align=false`` (crops
resized as they are). The clean
stage is then re-run with its defaults, with ``clean.max_angle_deg`` 60 / 75 / 90, and (aligned)
with other ``clean.impostor_percentile`` and ``clean.genuine_percentile`` values.

``held_out``: the claim rule's percentiles (impostor x genuine, ``HELD_OUT_GRID``) chosen on one set of
identities and reported on another: two seeded halves of the identities each way round, and ORL against
the deepface photos each way round (clean runs on all rows; a fold only splits whose rows are counted).

Reported per clean run (``label_noise`` = quarantined by clean with reason label_noise):
- ``label_noise_precision``: share of label_noise rows whose label was swapped;
- ``label_noise_recall``: share of swapped rows quarantined as label_noise;
- ``clean_false_flag_rate``: share of undegraded, correctly labelled rows quarantined as label_noise;
- ``unrecognizable_quarantined_share``: share of degraded copies quarantined as unrecognizable.
"""

from __future__ import annotations

import argparse
import io
import json
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

from ers_spark.config import load_config  # noqa: E402
from ers_spark.errors import ClusteringError  # noqa: E402
from ers_spark.core.synthetic import DEGRADATIONS, degrade  # noqa: E402
from ers_spark.lake.contracts import CROPS, EMBEDDINGS, QUARANTINE, SCORES  # noqa: E402
from ers_spark.runtime.session import build_session  # noqa: E402
from ers_spark.lake.tables import read_table  # noqa: E402
from ers_spark.pipeline import stage_runner  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
ORL = SHARED / "orl_faces"
DEEPFACE = SHARED / "deepface_photos"
SWAP_SHARE = 0.05
PHOTO_MAX_SIDE = 400
MAX_ANGLES = (60.0, 75.0, 90.0)
IMPOSTOR_PERCENTILES = (1.0, 2.0, 10.0)
GENUINE_PERCENTILES = (25.0, 50.0, 65.0, 75.0, 90.0)
# the held-out choice: every (impostor, genuine) percentile pair of this grid, the defaults (5, 60) among them
HELD_OUT_GRID = [(i, g) for i in (1.0, 2.0, 5.0, 10.0) for g in (25.0, 50.0, 60.0, 75.0, 90.0)]
TARGETS = {"label_noise_precision": ">= 0.9", "label_noise_recall": ">= 0.8", "clean_false_flag_rate": "<= 0.02"}


def meets_targets(figures: dict) -> bool:
    """Precision >= 0.9, recall >= 0.8, false flags <= 0.02; a missing figure (None) misses its target, a 0.0 does not.

    >>> meets_targets({"label_noise_precision": 1.0, "label_noise_recall": 0.857, "clean_false_flag_rate": 0.0})
    True
    >>> meets_targets({"label_noise_precision": 1.0, "label_noise_recall": None, "clean_false_flag_rate": 0.0})
    False
    """
    precision, recall, false_flags = (figures[k] for k in ("label_noise_precision", "label_noise_recall",
                                                           "clean_false_flag_rate"))
    return (precision is not None and precision >= 0.9 and recall is not None and recall >= 0.8
            and false_flags is not None and false_flags <= 0.02)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def deepface_identities() -> dict[str, str]:
    """file -> person, from the connected components of master.csv's "Yes" pairs."""
    pairs = pd.read_csv(DEEPFACE / "master.csv")
    parent: dict[str, str] = {}

    def root(a: str) -> str:
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    for a, b in pairs.loc[pairs.Decision == "Yes", ["file_x", "file_y"]].itertuples(index=False):
        parent[root(a)] = root(b)
    files = sorted(set(pairs.file_x) | set(pairs.file_y))
    roots = sorted({root(f) for f in files})
    return {f: f"deepface_p{roots.index(root(f))}" for f in files}


def source_images() -> pd.DataFrame:
    """Rows (path, true_identity, rgb) for ORL and the labelled deepface photos."""
    rows = []
    for p in sorted(ORL.glob("s*/*.pgm"), key=lambda p: (int(p.parent.name[1:]), int(p.stem))):
        rows.append((f"orl/{p.parent.name}/{p.stem}.png", p.parent.name, np.asarray(Image.open(p).convert("RGB"))))
    if DEEPFACE.is_dir():
        for name, person in sorted(deepface_identities().items()):
            photo = Image.open(DEEPFACE / name).convert("RGB")
            photo.thumbnail((PHOTO_MAX_SIDE, PHOTO_MAX_SIDE))  # degradations on multi-megapixel photos take minutes
            rows.append((f"deepface/{Path(name).stem}.png", person, np.asarray(photo)))
    return pd.DataFrame(rows, columns=["path", "true_identity", "rgb"])


def benchmark_input(seed: int = 0) -> pd.DataFrame:
    """Every source image (5 % with a swapped label) and one degraded copy of each (true label)."""
    rng = np.random.default_rng(seed)
    src = source_images()
    people = np.array(sorted(src.true_identity.unique()))
    n_swap = int(round(SWAP_SHARE * len(src)))
    swapped = set(rng.choice(len(src), n_swap, replace=False).tolist())
    rows = []
    for k, r in enumerate(src.itertuples(index=False)):
        label = r.true_identity
        if k in swapped:
            label = str(rng.choice(people[people != r.true_identity]))
        rows.append((r.path, label, _png(r.rgb), r.true_identity, False, "clean"))
        kind = DEGRADATIONS[k % len(DEGRADATIONS)]
        copy = r.path.replace(".png", f"_{kind}.png").replace("/", "_degraded/", 1)
        rows.append((copy, r.true_identity, _png(degrade(r.rgb, kind, rng)), r.true_identity, True, kind))
    return pd.DataFrame(rows, columns=["path", "identity", "bytes", "true_identity", "degraded", "kind"])


def outcomes(spark, cfg, data: pd.DataFrame) -> pd.DataFrame:
    """One row per scored embedding: its truth (swapped? degraded?) and what clean decided."""
    crops = read_table(spark, cfg, CROPS).select("image_id", "source_path").toPandas()
    scored = read_table(spark, cfg, SCORES).select("image_id").toPandas()
    q = read_table(spark, cfg, QUARANTINE).where("stage = 'clean'").select("image_id", "reason").toPandas()
    table = scored.merge(crops, on="image_id").merge(q, on="image_id", how="left")
    table["path"] = table.source_path
    table = table.merge(data[["path", "identity", "true_identity", "degraded"]], on="path")
    table["swapped"] = table.identity != table.true_identity
    return table


def metrics(table: pd.DataFrame, record: dict) -> dict:
    flagged = (table.reason == "label_noise").to_numpy()
    swapped = table.swapped.to_numpy()
    degraded = table.degraded.to_numpy()
    correct_clean = ~swapped & ~degraded
    ratio = lambda a, b: round(float(a) / float(b), 4) if b else None  # noqa: E731
    return {
        "label_noise_precision": ratio((flagged & swapped).sum(), flagged.sum()),
        "label_noise_recall": ratio((flagged & swapped).sum(), swapped.sum()),
        "clean_false_flag_rate": ratio((flagged & correct_clean).sum(), correct_clean.sum()),
        "unrecognizable_quarantined_share": ratio(((table.reason == "unrecognizable") & degraded).sum(), degraded.sum()),
        "clean_images_quarantined_unrecognizable": ratio(((table.reason == "unrecognizable") & ~degraded).sum(), (~degraded).sum()),
        "label_noise_flags": int(flagged.sum()),
        "label_noise_flags_on_degraded_copies": int((flagged & degraded).sum()),
        "swapped_rows": int(swapped.sum()),
        "swapped_rows_quarantined_unrecognizable": int(((table.reason == "unrecognizable") & swapped).sum()),
        "max_angle_deg_applied": record["params"].get("max_angle_deg_applied"),
        "claim_angle_deg_applied": record["params"].get("claim_angle_deg_applied"),
    }


def identity_folds(data: pd.DataFrame, seed: int = 1) -> dict[str, tuple[set, set]]:
    """(tuning identities, held-out identities) per fold, by the label each row carries: two seeded halves of
    the identities (each way round), and ORL against the deepface photos (each way round)."""
    people = np.array(sorted(data.identity.unique()))
    half = set(np.random.default_rng(seed).choice(people, people.size // 2, replace=False).tolist())
    other = set(people) - half
    orl = {p for p in people if not p.startswith("deepface_")}
    deepface = set(people) - orl
    folds = {"half_a_to_b": (half, other), "half_b_to_a": (other, half)}
    if deepface:
        folds.update({"orl_to_deepface": (orl, deepface), "deepface_to_orl": (deepface, orl)})
    return folds


def held_out_choice(tables: dict[tuple, pd.DataFrame], folds: dict[str, tuple[set, set]]) -> dict:
    """Per fold: the percentile pair chosen on the tuning identities (highest recall with precision >= 0.9
    and false flags <= 0.02 there; else the highest precision), and the figures it and the defaults give on
    the held-out identities. Clean runs on every identity (a flag needs the other identities' centres);
    the folds only split whose rows are counted."""
    def figures(table: pd.DataFrame, people: set) -> dict:
        return metrics(table[table.identity.isin(people)], {"params": {}})

    default = (5.0, 60.0)
    out = {}
    for name, (tune, hold) in folds.items():
        tuned = {pair: figures(table, tune) for pair, table in tables.items()}
        ok = [pair for pair, f in tuned.items() if f["label_noise_precision"] is not None
              and f["label_noise_precision"] >= 0.9 and (f["clean_false_flag_rate"] or 0.0) <= 0.02]
        if ok:
            chosen = max(ok, key=lambda pair: (tuned[pair]["label_noise_recall"] or 0.0, pair == default))
        else:
            chosen = max(tuned, key=lambda pair: (tuned[pair]["label_noise_precision"] or 0.0,
                                                  tuned[pair]["label_noise_recall"] or 0.0))
        keep = ("label_noise_precision", "label_noise_recall", "clean_false_flag_rate", "label_noise_flags",
                "swapped_rows")
        held = figures(tables[chosen], hold)
        out[name] = {
            "tuning_identities": len(tune), "held_out_identities": len(hold),
            "chosen": {"impostor_percentile": chosen[0], "genuine_percentile": chosen[1]},
            "on_tuning": {k: tuned[chosen][k] for k in keep},
            "held_out": {k: held[k] for k in keep},
            "held_out_meets_targets": meets_targets(held),
            "defaults_held_out": {k: v for k, v in figures(tables[default], hold).items() if k in keep},
        }
    return out


def run_lake(spark_holder: dict, work: Path, data: pd.DataFrame, *, align: bool, sweep_percentiles: bool) -> dict:
    """The whole pipeline in one lake, then clean with each setting; metrics per clean run."""
    lake = work / ("aligned" if align else "unaligned")
    base = [
        f"storage.root={lake}", "spark.master=local[2]", "spark.shuffle_partitions=4",
        f"spark.checkpoint_dir={lake / 'ckpt'}", "spark.hive_metastore=false",
        f"ingest.input_path={work / 'in.parquet'}", "ingest.input_format=parquet", "ingest.identity_column=identity",
        f"embed.align={'auto' if align else 'false'}",
        "locate_ui.kmeans_cells=4", "locate_ui.nprobe=2",
    ]
    cfg = load_config(overrides=base)
    if "spark" not in spark_holder:
        spark_holder["spark"] = build_session(cfg, "bench-cleaning")
    spark = spark_holder["spark"]
    records = {stage: stage_runner(stage)(spark, cfg) for stage in ("ingest", "embed", "locate-ui", "score")}
    embedded = read_table(spark, cfg, EMBEDDINGS).groupBy("aligned").count().toPandas()

    def clean_outcomes(*overrides: str) -> tuple[pd.DataFrame, dict]:
        c = load_config(overrides=base + list(overrides))
        record = stage_runner("clean")(spark, c)
        return outcomes(spark, c, data), record

    def clean_with(*overrides: str) -> dict:
        return metrics(*clean_outcomes(*overrides))

    result = {**clean_with(), "by_max_angle_deg": {str(int(a)): clean_with(f"clean.max_angle_deg={a}") for a in MAX_ANGLES}}
    if sweep_percentiles:
        result["by_impostor_percentile"] = {
            str(q): clean_with(f"clean.impostor_percentile={q}") for q in IMPOSTOR_PERCENTILES
        }
        result["by_genuine_percentile"] = {
            str(q): clean_with(f"clean.genuine_percentile={q}") for q in GENUINE_PERCENTILES
        }
        tables = {(i, g): clean_outcomes(f"clean.impostor_percentile={i}", f"clean.genuine_percentile={g}")[0]
                  for i, g in HELD_OUT_GRID}
        result["held_out"] = held_out_choice(tables, identity_folds(data))
    result["embeddings_by_aligned"] = {str(r["aligned"]).lower(): int(r["count"]) for r in embedded.to_dict("records")}
    result["gamma"] = records["score"]["params"].get("gamma")
    result["embed_counts"] = records["embed"]["counts"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cleaning.json"))
    args = parser.parse_args()
    if not ORL.is_dir():
        raise SystemExit(f"cleaning bench needs the shared ORL faces at {ORL}")
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ers-bench-cleaning-"))
    data = benchmark_input()
    data[["path", "identity", "bytes"]].to_parquet(work / "in.parquet")
    holder: dict = {}
    aligned = run_lake(holder, work, data, align=True, sweep_percentiles=True)
    Path(args.out).with_suffix(".partial.json").write_text(json.dumps(aligned, indent=2, default=str) + "\n")
    try:
        unaligned = run_lake(holder, work, data, align=False, sweep_percentiles=False)
    except ClusteringError as exc:  # raw crops through dlib: no UI may be found (say so, do not fail the bench)
        unaligned = {"error": str(exc)[:400]}
    defaults = {k: v for k, v in aligned.items() if not isinstance(v, dict) or k == "embed_counts"}
    result = {
        "what": "the defaults (embed.align: auto, the dlib spec's chips); by_max_angle_deg: clean.max_angle_deg "
                "fixed; unaligned: the same with embed.align=false",
        **defaults,
        "by_max_angle_deg": aligned["by_max_angle_deg"],
        "by_impostor_percentile": aligned["by_impostor_percentile"],
        "by_genuine_percentile": aligned["by_genuine_percentile"],
        "held_out": aligned["held_out"],
        "held_out_grid": [{"impostor_percentile": i, "genuine_percentile": g} for i, g in HELD_OUT_GRID],
        "embeddings_by_aligned": aligned["embeddings_by_aligned"],
        "unaligned": unaligned,
        "targets": TARGETS,
        "meets_targets": meets_targets(aligned),
        "data": {
            "images": int((~data.degraded).sum()), "degraded_copies": int(data.degraded.sum()),
            "identities": int(data.true_identity.nunique()), "swapped_labels": int((data.identity != data.true_identity).sum()),
            "sources": "shared orl_faces (400) + deepface_photos labelled in master.csv (25)",
        },
        "clean_defaults": {k: v for k, v in vars(load_config().clean).items()},
        "seconds": round(time.perf_counter() - t0, 1),
        **run_provenance(),
    }
    write_result(args.out, result)
    holder["spark"].stop()
    Path(args.out).with_suffix(".partial.json").unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
