"""Benchmark locate-ui on synthetic vMF embeddings: graph vs sample-hac vs exact HAC vs MLlib KMeans.

Usage::

    python bench/cluster.py                      # N = 10k, 100k, 1M
    python bench/cluster.py --sizes 10000,100000

Writes ``bench/results/cluster.json`` after every size (partial results survive
an interrupted run). Wall times are on Spark ``local[2]``; peak memory is the
max over time of the summed RSS of this Python process, its JVM and the
PySpark Python workers (sampled from /proc every 0.2 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import run_provenance  # noqa: E402  (bench/, beside this script)

from ers_spark.config import load_config  # noqa: E402
from ers_spark.lake.contracts import EMBEDDING, EMBEDDINGS, IMAGE_ID, UI_CENTROIDS, UI_MEMBERS, UIC_ID  # noqa: E402
from ers_spark.core.ers import ui_centroid  # noqa: E402
from ers_spark.lake.tables import append, read_table  # noqa: E402
from ers_spark.core.linkage import exact_single_linkage, jaccard  # noqa: E402
from ers_spark.core.synthetic import RECOMMENDED_EPS, iter_vmf_chunks  # noqa: E402

OUT = ROOT / "bench" / "results" / "cluster.json"
BENCH_ROOT = Path("/tmp/ers-bench")
KMEANS_K = 1000
KMEANS_MAX_ITER = 10


def cells_for(n: int) -> int:
    """Coarse cells: ~n/4000 points per cell (x nprobe), at least 4."""
    return max(4, int(round(n / 4000)))


class PeakRss:
    """Background sampler: max of (this process + every descendant) RSS, from /proc."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree_rss() -> int:
        parents: dict[int, int] = {}
        rss: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
                parents[int(d)] = int(stat[1])
                rss[int(d)] = int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError, ValueError):
                continue
        me = os.getpid()
        keep, frontier = {me}, [me]
        while frontier:
            p = frontier.pop()
            kids = [c for c, pp in parents.items() if pp == p and c not in keep]
            keep.update(kids)
            frontier.extend(kids)
        return sum(rss.get(p, 0) for p in keep)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self.peak = self._tree_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn: Any) -> tuple[Any, float, float]:
    """(result, seconds, peak MiB of the process tree) of ``fn()``."""
    with PeakRss() as mem:
        t0 = time.perf_counter()
        out = fn()
        secs = time.perf_counter() - t0
    return out, round(secs, 2), round(mem.peak / 2**20, 1)


def write_table(spark: Any, cfg: Any, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Write N vMF rows (10 per identity, 10 % UI) to the embeddings table in chunks.

    Returns (planted labels, planted UI sum, all rows when N <= 20k else None).
    """
    from datetime import datetime

    n_id = int(round(n * 0.9 / 10))
    labels, ui_sum, keep, start = [], None, [], 0
    for x, y in iter_vmf_chunks(n_id, 10, dim=128, ui_share=0.1, seed=seed, chunk_rows=100_000):
        m = x.shape[0]
        ids = pa.array([f"i{start + i:08d}" for i in range(m)], pa.string())
        emb = pa.ListArray.from_arrays(pa.array(np.arange(0, m * 128 + 1, 128, dtype=np.int32)), pa.array(x.ravel()))
        table = pa.table({
            IMAGE_ID: ids, EMBEDDING: emb, "raw_norm": pa.array(np.ones(m, np.float32)),
            "model_name": pa.array(["synthetic"] * m), "model_version": pa.array(["1"] * m),
            "embedded_at": pa.array([datetime(2024, 1, 1)] * m, pa.timestamp("us")),
            "aligned": pa.array([None] * m, pa.bool_()),  # the embeddings contract's column (null: not a face chip)
        })
        append(spark, cfg, EMBEDDINGS, spark.createDataFrame(table))
        s = x[y < 0].astype(np.float64).sum(axis=0)
        ui_sum = s if ui_sum is None else ui_sum + s
        labels.append(y)
        if n <= 20_000:
            keep.append(x)
        start += m
    return np.concatenate(labels), ui_sum, (np.concatenate(keep) if keep else None)


def members_of(spark: Any, cfg: Any, uic_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(member row indices, centroid) of a stored UIC."""
    row = read_table(spark, cfg, UI_CENTROIDS).where(f"{UIC_ID} = '{uic_id}'").first()
    ids = read_table(spark, cfg, UI_MEMBERS).where(f"{UIC_ID} = '{uic_id}'").select(IMAGE_ID).toArrow()
    idx = np.asarray([int(s[1:]) for s in ids.column(IMAGE_ID).to_pylist()], dtype=np.int64)
    return idx, np.asarray(row["centroid"], np.float64)


def bench_size(spark: Any, base: list[str], n: int, seed: int, graphframes: bool = False) -> dict[str, Any]:
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.functions import array_to_vector

    from ers_spark.stages.locate_ui import run_locate_ui

    root = BENCH_ROOT / f"n{n}"
    shutil.rmtree(root, ignore_errors=True)
    cells = cells_for(n)
    common = [f"storage.root={root}", f"storage.database=bench_n{n}", f"locate_ui.eps={RECOMMENDED_EPS}",
              f"locate_ui.kmeans_cells={cells}", "locate_ui.nprobe=2", "locate_ui.block_size=2048",
              "locate_ui.kmeans_sample_rows=50000", "locate_ui.sample_hac_rows=20000",
              "locate_ui.dominance_ratio=5"]
    cfg = load_config(overrides=base + common)
    (labels, ui_sum, x_all), write_s, _ = timed(lambda: write_table(spark, cfg, n, seed))
    res: dict[str, Any] = {"n": n, "write_s": write_s, "eps": RECOMMENDED_EPS, "kmeans_cells": cells, "nprobe": 2}
    print(f"[n={n}] wrote table in {write_s}s", flush=True)

    rec, res["graph_s"], res["graph_peak_mib"] = timed(lambda: run_locate_ui(spark, cfg))
    res["edges_emitted"] = rec["counts"]["links"]
    res["raw_edges"] = rec["counts"]["raw_edges"]
    res["cc_rounds"] = rec["counts"]["cc_rounds"]
    res["graph_members"] = rec["counts"]["members"]
    res["graph_top_sizes"] = rec["params"]["top_cluster_sizes"]
    g_idx, g_c = members_of(spark, cfg, rec["params"]["uic_id"])
    print(f"[n={n}] graph {res['graph_s']}s", flush=True)

    if graphframes:  # the same graph method with GraphFrames' connected components instead of the builtin pass
        cfg_g = load_config(overrides=base + common + ["locate_ui.connected_components=graphframes",
                                                        "locate_ui.recompute=true"])
        rec_g, res["graph_graphframes_s"], res["graph_graphframes_peak_mib"] = timed(lambda: run_locate_ui(spark, cfg_g))
        gf_idx, gf_c = members_of(spark, cfg_g, rec_g["params"]["uic_id"])
        res["graphframes_jaccard_vs_builtin"] = round(jaccard(gf_idx, g_idx), 5)
        res["graphframes_uic_cos_vs_builtin"] = round(float(gf_c @ g_c), 6)
        print(f"[n={n}] graph with GraphFrames {res['graph_graphframes_s']}s", flush=True)

    cfg_s = load_config(overrides=base + common + ["locate_ui.method=sample-hac"])
    rec_s, res["sample_hac_s"], res["sample_hac_peak_mib"] = timed(lambda: run_locate_ui(spark, cfg_s))
    s_idx, s_c = members_of(spark, cfg_s, rec_s["params"]["uic_id"])
    res["sample_hac_rows"] = rec_s["counts"]["sampled_rows"]
    print(f"[n={n}] sample-hac {res['sample_hac_s']}s", flush=True)

    if x_all is not None:
        lab, res["exact_hac_s"], res["exact_hac_peak_mib"] = timed(lambda: exact_single_linkage(x_all, RECOMMENDED_EPS))
        u, c = np.unique(lab, return_counts=True)
        ref_idx = np.flatnonzero(lab == u[np.argmax(c)])
        ref_c = ui_centroid(x_all[ref_idx]).astype(np.float64)
        res["reference"] = "exact scipy single linkage at the same eps (largest cluster)"
    else:
        res["exact_hac_s"] = None
        ref_idx = np.flatnonzero(labels < 0)
        ref_c = ui_sum / np.linalg.norm(ui_sum)
        res["reference"] = "planted UI labels of the generator (exact HAC does not fit: O(N^2) memory)"
    res["jaccard_vs_exact"] = round(jaccard(g_idx, ref_idx), 5)
    res["uic_cos_vs_exact"] = round(float(g_c @ ref_c), 6)
    res["sample_hac_uic_cos_vs_exact"] = round(float(s_c @ ref_c), 6)
    res["sample_hac_members_in_reference"] = round(float(np.isin(s_idx, ref_idx).mean()), 5)

    def kmeans() -> Any:
        emb = read_table(spark, cfg, EMBEDDINGS).select(array_to_vector(EMBEDDING).alias("features"))
        return KMeans(k=KMEANS_K, maxIter=KMEANS_MAX_ITER, seed=seed, initMode="random",
                      distanceMeasure="cosine").fit(emb)

    _, res["kmeans_s"], res["kmeans_peak_mib"] = timed(kmeans)
    res["kmeans_note"] = f"MLlib KMeans k={KMEANS_K}, maxIter={KMEANS_MAX_ITER}, initMode=random, cosine, on the full table"
    print(f"[n={n}] kmeans {res['kmeans_s']}s", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--graphframes-jar", default=None,
                    help="also time the graph method with GraphFrames connected components (jar from "
                         "deploy/build_graphframes_jar.sh; graphframes-py of the same version importable)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    import pyspark

    from ers_spark.runtime.session import build_session

    base = [f"storage.root={BENCH_ROOT}", "spark.master=local[2]", "spark.driver_memory=10g",
            "spark.shuffle_partitions=8", f"spark.checkpoint_dir={BENCH_ROOT / 'checkpoints'}",
            "spark.hive_metastore=false"]
    if args.graphframes_jar:
        base.append(f"spark.conf={{spark.jars: '{args.graphframes_jar}'}}")
    spark = build_session(load_config(overrides=base), "bench-cluster")
    out_path = Path(args.out)
    result: dict[str, Any] = run_provenance()  # this run only: sizes of earlier runs are never merged in
    result.update({
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "pyspark": pyspark.__version__,
                    "numpy": np.__version__, "master": "local[2]", "platform": platform.platform()},
        "notes": "eps fixed at synthetic.RECOMMENDED_EPS (no grid search); peak_mib = max summed RSS of "
                 "driver python + JVM + python workers; other jobs may have shared the 2 cores",
    })
    per_n: dict[str, dict[str, Any]] = {}
    for n in sizes:
        per_n[str(n)] = bench_size(spark, base, n, args.seed, graphframes=bool(args.graphframes_jar))
        result["sizes"] = [per_n[k] for k in sorted(per_n, key=int)]
        t100k, t1m = per_n.get("100000", {}).get("graph_s"), per_n.get("1000000", {}).get("graph_s")
        result["growth_exponent_100k_1m"] = (
            round(float(np.log(t1m / t100k) / np.log(10)), 3) if t100k and t1m else None
        )
        result["driver_maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(per_n[str(n)]), flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
