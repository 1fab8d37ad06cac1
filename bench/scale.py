"""Scale benchmark: bring-your-own embeddings at 1e5 .. 1e7 rows through import, locate-ui, score, clean, and the
figures of the 1e9 design measured on the 1e7 rows.

Usage::

    python bench/scale.py                          # sizes 1e5, 1e6, 1e7, then the 1e9-design figures on 1e7 (~2 h)
    ERS_BENCH_DIR=/tmp/try ERS_SCALE_OUT=/tmp/try.json python bench/scale.py --sizes 20000 --billion-of 20000 \
        --plan-rows 2000000 --few-per-identity 100 --image-crops 0   # a quick trial of every step

Each size runs in its own child process (``--one N``), so the driver's peak RSS is measured per
size: the Python driver's ``ru_maxrss`` and the peak RSS of its JVM (Spark ``local[2]``, so the
JVM also holds the executors' memory). The input is the vMF generator of
:mod:`ers_spark.core.synthetic` (10 images per identity, 10 % UI, seed 0) written as a Parquet
table of (id, vector, identity); ``ers-spark import-embeddings`` reads it. eps is fixed at 0.4.

In the same child, the single-process baseline a user would otherwise run: faiss ``IndexIVFFlat``
kNN (k = 10, nprobe 8, nlist = 4 sqrt(n)) over all rows, links with cosine >= 1 - eps, scipy
connected components. At 1e5 the exact single linkage at eps (all pairs, blocked, one process)
is the reference for Jaccard and UIC cosine; at every size the planted UI is too.

The 1e9 design, on the rows of ``--billion-of`` (1e7): the plan a ``--plan-rows`` (1e9) table gets, built
in its own child (its time and the Python driver's peak RSS: ``plan_s_1e9``, ``plan_peak_mib_1e9``); the
assignment pass of locate-ui over the same persisted rows with the 1e7 table's plan and with that 1e9 plan
(``assign_s_per_mrow_1e7``, ``assign_s_per_mrow_cells_1e9`` and their ratio); and the whole pipeline again on
1e7 rows of 1e4 identities of 1,000 (``--few-per-identity``), whose clean time is set against the 1e7 size's
(1e6 identities of 10): ``clean_ratio_many_identities``. ``targets`` says which figure meets its target.

With ``--image-crops N`` also issue 13's image path (``bench/image_path.py``): ingest + embed of N JPEG crops
(ORL variants) from one Parquet file, with today's code and with the code before issue 13 (a detached worktree of
``image_path.OLD_COMMIT``), each in its own child. Off by default: today's code aligns each crop (the default
model's spec) where that old code resized it, so the two no longer do the same work; ``bench/embed.py`` measures
the image path with and without alignment on the same crops (``embed.json``).

Writes ``bench/results/scale.json`` after every step, every figure from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import run_provenance  # noqa: E402  (bench/, beside this script)

OUT = Path(os.environ.get("ERS_SCALE_OUT", ROOT / "bench" / "results" / "scale.json"))  # a trial run writes elsewhere
WORK = Path(os.environ.get("ERS_BENCH_DIR", "/tmp/ers-scale"))
EPS = 0.4
PER_IDENTITY = 10
UI_SHARE = 0.1
STAGES = ("import-embeddings", "locate-ui", "score", "clean")
SIZES = (100_000, 1_000_000, 10_000_000)


# --------------------------------------------------------------------------- measuring


class JvmPeakRss:
    """Peak RSS of this process's child JVM (sampled from /proc every 0.5 s)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _jvm_rss(self) -> int:
        total = 0
        me = str(os.getpid())
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                if stat[1] == me:
                    total += int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError, ValueError):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self._jvm_rss())

    def __enter__(self) -> "JvmPeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def python_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- input


def size_root(n: int, per_identity: int = PER_IDENTITY) -> Path:
    """The work folder of one size (input, lake, checkpoints); another identity size gets its own."""
    return WORK / (str(n) if per_identity == PER_IDENTITY else f"{n}-per{per_identity}")


def write_input(n: int, path: Path, per_identity: int = PER_IDENTITY) -> tuple[np.ndarray, float]:
    """The generator's rows as Parquet (id, vector, identity); returns the planted UI's unit sum direction."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ers_spark.core.synthetic import iter_vmf_chunks

    n_identities = int(round(n * (1 - UI_SHARE) / per_identity))
    ui_sum = None
    start = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    offset = 0
    for part, (x, labels) in enumerate(iter_vmf_chunks(n_identities, per_identity, ui_share=UI_SHARE, seed=0,
                                                       chunk_rows=500_000)):
        ids = np.arange(offset, offset + x.shape[0])
        offset += x.shape[0]
        s = x[labels < 0].astype(np.float64).sum(axis=0)
        ui_sum = s if ui_sum is None else ui_sum + s
        d = x.shape[1]
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), d)
        table = pa.table({
            "id": pa.array([f"v{i:09d}" for i in ids]),
            "vector": vectors.cast(pa.list_(pa.float32())),
            "identity": pa.array(np.where(labels < 0, None, labels.astype(str)).tolist(), pa.string()),
        })
        pq.write_table(table, path / f"part-{part:05d}.parquet")
    return ui_sum / np.linalg.norm(ui_sum), time.perf_counter() - start


def planted_ui_ids(n: int, per_identity: int = PER_IDENTITY) -> np.ndarray:
    """Row numbers of the planted UI (label < 0), in generator order."""
    from ers_spark.core.synthetic import vmf_layout

    labels = vmf_layout(int(round(n * (1 - UI_SHARE) / per_identity)), per_identity, UI_SHARE, 0)
    return np.flatnonzero(labels < 0)


# --------------------------------------------------------------------------- baselines


def load_all(path: Path) -> np.ndarray:
    """Every vector of the input as one float32 matrix, filled batch by batch (one copy in memory)."""
    import pyarrow.parquet as pq

    dataset = pq.ParquetDataset(path)
    n = sum(f.metadata.num_rows for f in dataset.fragments)
    out: np.ndarray | None = None
    at = 0
    for fragment in dataset.fragments:
        for batch in fragment.to_batches(columns=["vector"]):
            col = batch.column(0)
            values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
            if out is None:
                out = np.empty((n, values.shape[1]), np.float32)
            out[at:at + len(col)] = values
            at += len(col)
    assert out is not None and at == n
    return out


def faiss_baseline(x: np.ndarray) -> tuple[np.ndarray, float]:
    """faiss IVFFlat kNN (k=10, nprobe 8) + scipy connected components: the largest component's rows."""
    import faiss
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    start = time.perf_counter()
    n, d = x.shape
    nlist = int(4 * np.sqrt(n))
    quantiser = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantiser, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    index.train(x[rng.choice(n, min(n, 64 * nlist), replace=False)])
    index.add(x)
    index.nprobe = 8
    sims, nbrs = index.search(x, 10)
    keep = (sims >= 1 - EPS) & (nbrs >= 0)
    rows = np.repeat(np.arange(n), 10)[keep.ravel()]
    graph = coo_matrix((np.ones(rows.size, bool), (rows, nbrs.ravel()[keep.ravel()])), shape=(n, n))
    _, labels = connected_components(graph, directed=True, connection="weak")
    return np.flatnonzero(labels == np.bincount(labels).argmax()), time.perf_counter() - start


def exact_ui(x: np.ndarray) -> np.ndarray:
    """Exact single linkage at eps (every pair, blocked), one process: the largest component's rows."""
    from ers_spark.core.linkage import eps_spanning_links, links_to_labels

    ids = np.arange(x.shape[0], dtype=np.int64)
    out = eps_spanning_links(ids, x, EPS, block_size=4096)
    labels = links_to_labels(ids, out.src, out.dst)
    return np.flatnonzero(labels == np.bincount(labels).argmax())


# --------------------------------------------------------------------------- one size


def overrides(n: int, root: Path, data: Path) -> list[str]:
    """What a user would set for this run: paths, the imported model, eps, and Spark sizes."""
    return [
        f"storage.root={root / 'lake'}", "storage.database=ers_scale", f"spark.checkpoint_dir={root / 'checkpoints'}",
        "spark.driver_memory=10g", f"spark.shuffle_partitions={max(8, n // 50_000)}",
        "spark.arrow_max_records_per_batch=4096",
        f"import_embeddings.input_path={data}", "import_embeddings.input_format=parquet",
        "import_embeddings.id_column=id", "import_embeddings.vector_column=vector",
        "import_embeddings.identity_column=identity", "import_embeddings.model_name=vmf-synthetic",
        "import_embeddings.model_version=1",
        f"locate_ui.eps={EPS}", "locate_ui.kmeans_cells=null", "locate_ui.dominance_ratio=5",
    ]


def run_stages(cfg: Any) -> dict[str, Any]:
    from ers_spark.runtime.session import build_session
    from ers_spark.pipeline import stage_runner

    spark = build_session(cfg, "scale")
    out: dict[str, Any] = {}
    for stage in STAGES:
        start = time.perf_counter()
        rec = stage_runner(stage)(spark, cfg)
        key = stage.replace("-", "_").replace("import_embeddings", "import")
        out[f"{key}_s"] = round(time.perf_counter() - start, 1)
        out[f"{key}_counts"] = rec.get("counts", {})
        (WORK / "progress.json").write_text(json.dumps(out))  # partial figures survive an interrupted size
        if stage == "locate-ui":
            out["uic_id"] = rec["params"]["uic_id"]
    return out


def stored_ui(cfg: Any, uic_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(member row numbers, UIC) as stored by locate-ui."""
    from pyspark.sql import functions as F

    from ers_spark.lake.contracts import CENTROID, IMAGE_ID, UI_CENTROIDS, UI_MEMBERS, UIC_ID
    from ers_spark.runtime.session import build_session
    from ers_spark.lake.tables import read_table

    spark = build_session(cfg, "scale")
    members = read_table(spark, cfg, UI_MEMBERS).where(F.col(UIC_ID) == uic_id).select(IMAGE_ID).toArrow()
    rows = np.sort(np.asarray([int(s[1:]) for s in members.column(IMAGE_ID).to_pylist()]))
    centroid = read_table(spark, cfg, UI_CENTROIDS).where(F.col(UIC_ID) == uic_id).first()[CENTROID]
    return rows, np.asarray(centroid, np.float64)


def unit_mean(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    s = x[rows].astype(np.float64).sum(axis=0)
    return s / np.linalg.norm(s)


def _quality(n: int, root: Path, result: dict[str, Any], members: np.ndarray, uic: np.ndarray,
             per_identity: int = PER_IDENTITY) -> dict[str, Any]:
    """UI figures against the planted UI; members and UIC saved for the baselines' own process."""
    from ers_spark.core.linkage import jaccard

    np.save(root / "members.npy", members)
    np.save(root / "uic.npy", uic)
    result["ui_members"] = int(members.size)
    result["jaccard_vs_planted"] = round(jaccard(members, planted_ui_ids(n, per_identity)), 6)
    result["uic_cos_vs_planted"] = round(float(uic @ np.load(root / "planted_uic.npy")), 6)
    result["pair_comparisons"] = int(result["locate_ui_counts"].get("pair_comparisons", 0))
    return result


def one_size(n: int, per_identity: int = PER_IDENTITY) -> dict[str, Any]:
    """The Spark stages at size n (one JVM), then the UI they stored; the baselines run in another process."""
    from ers_spark.config import load_config

    root = size_root(n, per_identity)
    result: dict[str, Any] = {"n": n, "per_identity": per_identity,
                              "generate_s": json.loads((root / "generate.json").read_text())["generate_s"]}
    with JvmPeakRss() as jvm:
        cfg = load_config(overrides=overrides(n, root, root / "input"))
        result.update(run_stages(cfg))
        result["driver_python_peak_mib"] = round(python_peak_mib(), 1)  # before the benchmark's own collects below
        result["driver_jvm_peak_mib"] = round(jvm.peak / 2**20, 1)
        members, uic = stored_ui(cfg, result.pop("uic_id"))
    return _quality(n, root, result, members, uic, per_identity)


def _points(n: int) -> tuple[Any, Any, Any]:
    """(session, config, the size's embeddings as locate-ui's points, persisted and counted)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from ers_spark.config import load_config
    from ers_spark.distributed.cells import POINT_ID
    from ers_spark.lake.contracts import EMBEDDING, EMBEDDINGS, IMAGE_ID
    from ers_spark.lake.tables import read_table
    from ers_spark.runtime.session import build_session

    root = size_root(n)
    cfg = load_config(overrides=overrides(n, root, root / "input"))
    spark = build_session(cfg, "scale")
    points = read_table(spark, cfg, EMBEDDINGS).select(F.monotonically_increasing_id().alias(POINT_ID), IMAGE_ID, EMBEDDING)
    points = points.persist(StorageLevel.MEMORY_AND_DISK)
    assert points.count() == n
    return spark, cfg, points


def plan_for(n: int, sizing: int) -> dict[str, Any]:
    """The plan a ``sizing``-row table gets (cells, counted sizes, sub-centres trained on the executors), built
    on the n rows of this size: its time and the driver's peak memory; the plan is saved for :func:`assign_pass`."""
    import pickle

    from ers_spark.distributed.cells import quantiser_plan, sub_sample_share

    with JvmPeakRss() as jvm:
        spark, cfg, points = _points(n)
        before = python_peak_mib()
        start = time.perf_counter()
        centres, plan = quantiser_plan(points, n, cfg.locate_ui, sizing_rows=sizing)
        seconds = time.perf_counter() - start
        peak = python_peak_mib()
        jvm_peak = jvm.peak
    with open(size_root(n) / f"plan_{sizing}.pkl", "wb") as f:
        pickle.dump((centres, plan), f)
    spark.stop()
    return {"n": n, "sizing_rows": sizing, "plan_s": round(seconds, 1), "plan_peak_mib": round(peak, 1),
            "python_peak_mib_before_plan": round(before, 1), "jvm_peak_mib": round(jvm_peak / 2**20, 1),
            "cells": int(centres.shape[0]), "cut_cells": len(plan.sub_centres), "groups": plan.groups,
            "sub_sample_share": round(sub_sample_share(n, sizing, cfg.locate_ui), 6)}


ASSIGN_REPEATS = 2  # timed passes per plan, alternating


def assign_pass(n: int, sizing: int) -> dict[str, Any]:
    """locate-ui's assignment pass (rows -> their groups, written nowhere) on the same n persisted rows, with the
    plan of an n-row table and with the saved plan of a ``sizing``-row table: seconds per million rows, the
    fastest of ``ASSIGN_REPEATS`` passes each (one pass each moved the ratio by about 0.1 between runs, see
    ``bench/assign_kernel.py``)."""
    import pickle

    from ers_spark.distributed.cells import assign_cells, quantiser_plan

    spark, cfg, points = _points(n)
    with open(size_root(n) / f"plan_{sizing}.pkl", "rb") as f:
        plans = {sizing: pickle.load(f)}
    plans[n] = quantiser_plan(points, n, cfg.locate_ui)
    out: dict[str, Any] = {"n": n}
    warm = spark.sparkContext.broadcast(plans[n])  # a first pass starts the Python workers: timed passes run warm
    assign_cells(points, warm, cfg.locate_ui.nprobe).write.format("noop").mode("overwrite").save()
    warm.destroy()
    rows_of = {"own": n, "sizing": sizing}
    seconds: dict[str, list[float]] = {label: [] for label in rows_of}
    for order in range(ASSIGN_REPEATS):  # the plans alternate, each first in turn: drift and noise hit both alike
        labels = ("own", "sizing") if order % 2 == 0 else ("sizing", "own")
        for label in labels:
            plan_bc = spark.sparkContext.broadcast(plans[rows_of[label]])
            start = time.perf_counter()
            assign_cells(points, plan_bc, cfg.locate_ui.nprobe).write.format("noop").mode("overwrite").save()
            seconds[label].append(round(time.perf_counter() - start, 1))
            plan_bc.destroy()
    for label, rows in rows_of.items():
        centres, plan = plans[rows]
        best = min(seconds[label])
        out[label] = {"cells_of_rows": rows, "seconds": best, "seconds_each": seconds[label],
                      "s_per_mrow": round(best / (n / 1e6), 3), "cells": int(centres.shape[0]),
                      "cut_cells": len(plan.sub_centres), "groups": plan.groups}
    spark.stop()
    return out


def baselines_of_size(n: int) -> dict[str, Any]:
    """The single-process baselines at size n, in a process without a JVM (they need most of the memory)."""
    root = WORK / str(n)
    return baselines(n, root, np.load(root / "members.npy"), np.load(root / "uic.npy"))


def generate(n: int, per_identity: int = PER_IDENTITY) -> None:
    """Write the input table in its own process, so its memory is not the driver's peak."""
    root = size_root(n, per_identity)
    shutil.rmtree(root, ignore_errors=True)
    planted_uic, generate_s = write_input(n, root / "input", per_identity)
    np.save(root / "planted_uic.npy", planted_uic)
    (root / "generate.json").write_text(json.dumps({"generate_s": round(generate_s, 1)}))


def baselines(n: int, root: Path, members: np.ndarray, uic: np.ndarray) -> dict[str, Any]:
    """faiss + scipy baseline at every size; exact single linkage where it is feasible (1e5)."""
    from ers_spark.core.linkage import jaccard

    x = load_all(root / "input")
    out: dict[str, Any] = {}
    faiss_members, faiss_s = faiss_baseline(x)
    out.update(faiss_s=round(faiss_s, 1), faiss_jaccard_vs_planted=round(jaccard(faiss_members, planted_ui_ids(n)), 6))
    if n <= 100_000:
        start = time.perf_counter()
        ref = exact_ui(x)
        out.update(exact_s=round(time.perf_counter() - start, 1), jaccard_vs_exact=round(jaccard(members, ref), 6),
                   uic_cos_vs_exact=round(float(uic @ unit_mean(x, ref)), 6), exact_pair_comparisons=n * (n - 1) // 2)
    return out


# --------------------------------------------------------------------------- summary


def growth(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    """log(time ratio) / log(size ratio); None where either size did not measure ``key``."""
    if not a.get(key) or not b.get(key):
        return None
    return round(float(np.log(b[key] / a[key]) / np.log(b["n"] / a["n"])), 3)


def summarise(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    by_n = {s["n"]: s for s in sizes}
    out: dict[str, Any] = {
        "min_jaccard": min(min(s["jaccard_vs_planted"], s.get("jaccard_vs_exact", 1.0)) for s in sizes),
        "min_uic_cos": min(min(s["uic_cos_vs_planted"], s.get("uic_cos_vs_exact", 1.0)) for s in sizes),
    }
    peaks = [s["driver_python_peak_mib"] for s in sizes if s.get("driver_python_peak_mib")]
    if len(peaks) > 1:
        out["driver_python_peak_mib_max_over_min"] = round(max(peaks) / min(peaks), 3)
    if 1_000_000 in by_n:
        out["ratio_vs_faiss_1e6"] = round(by_n[1_000_000]["locate_ui_s"] / by_n[1_000_000]["faiss_s"], 3)
    if 10_000_000 in by_n:
        big = by_n[10_000_000]
        out["locate_ui_s_1e7"] = big["locate_ui_s"]
        out["ratio_vs_faiss_1e7"] = round(big["locate_ui_s"] / big["faiss_s"], 3) if big.get("faiss_s") else None
        if 1_000_000 in by_n:
            exps = {f"growth_exponent_1e6_1e7_{k}": growth(by_n[1_000_000], big, f"{k}_s")
                    for k in ("import", "locate_ui", "score", "clean")}
            out.update(exps)
            out["max_growth_exponent_1e6_1e7"] = max((e for e in exps.values() if e is not None), default=None)
    return out


def _child_result(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"{' '.join(cmd[1:3])} failed (exit {proc.returncode})")
    return json.loads(line[len("RESULT "):])


def old_code() -> Path:
    """A detached worktree of the code before issue 13 (made once)."""
    from image_path import OLD_COMMIT

    tree = WORK / f"code-{OLD_COMMIT}"
    if not (tree / "ers_spark").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--force", "--detach", str(tree), OLD_COMMIT], check=True)
    return tree


def image_path(n: int) -> dict[str, Any]:
    """Ingest + embed of n JPEG crops, today's code and the old code, side by side."""
    from image_path import OLD_COMMIT

    script = str(Path(__file__).with_name("image_path.py"))
    data = WORK / "images" / f"crops{n}.parquet"
    subprocess.run([sys.executable, script, "--make", str(n), str(data)], check=True)
    out: dict[str, Any] = {"crops": n, "old_commit": OLD_COMMIT, "cores": 2}
    for label, code in (("new", ROOT), ("old", old_code())):
        env = {**os.environ, "PYTHONPATH": str(code)}
        out[label] = _child_result([sys.executable, script, "--run", str(n), str(data), str(WORK / "images" / label)], env)
        print(json.dumps({label: out[label]}), flush=True)
    for stage in ("ingest", "embed"):
        key = f"{stage}_images_per_s_per_core"
        out[f"{stage}_ratio_new_vs_old"] = round(out["new"][key] / out["old"][key], 3)
    return out


TARGETS = {  # key: (comparison, bound), from the issues that set them
    "max_growth_exponent_1e6_1e7": ("<=", 1.15), "min_jaccard": (">=", 0.99), "min_uic_cos": (">=", 0.9999),
    "ratio_vs_faiss_1e6": ("<=", 1.5), "assign_cost_ratio_1e9_cells": ("<=", 1.2), "plan_s_1e9": ("<=", 600),
    "plan_peak_mib_1e9": ("<=", 4096), "clean_ratio_many_identities": ("<=", 1.5),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--image-crops", type=int, default=0, help="crops for the old-vs-new image path of issue 13 "
                        "(default 0: skipped; today's image-path figures are bench/embed.py's)")
    parser.add_argument("--billion-of", type=int, default=SIZES[-1], help="the size whose rows get the plan of "
                        "--plan-rows rows, its assignment pass, and the few-identities clean (0: skip them)")
    parser.add_argument("--plan-rows", type=int, default=1_000_000_000, help="the table size the big plan is for")
    parser.add_argument("--few-per-identity", type=int, default=1000, help="images per identity of the few-identities table")
    parser.add_argument("--per-identity", type=int, default=PER_IDENTITY, help=argparse.SUPPRESS)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--baselines", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--assign", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate is not None:
        generate(args.generate, args.per_identity)
        return
    children = ((args.one, lambda n: one_size(n, args.per_identity)), (args.baselines, baselines_of_size),
                (args.plan, lambda a: plan_for(*a)), (args.assign, lambda a: assign_pass(*a)))
    for flag, fn in children:
        if flag is not None:
            print("RESULT " + json.dumps(fn(flag)), flush=True)
            return
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    sizes: dict[int, dict[str, Any]] = {}  # a new run: nothing of an earlier run's file is kept
    images = {**image_path(args.image_crops), "run_started": started} if args.image_crops else None
    write_result(sizes, images, started, {})
    for n in (int(s) for s in args.sizes.split(",") if s):
        subprocess.run([sys.executable, __file__, "--generate", str(n)], check=True)
        sizes[n] = {**_child_result([sys.executable, __file__, "--one", str(n)]), "run_started": started}
        sizes[n].update(_child_result([sys.executable, __file__, "--baselines", str(n)]))
        write_result(sizes, images, started, {})
        print(json.dumps(sizes[n]), flush=True)
    big = args.billion_of
    if not big:
        return
    if big not in sizes:
        raise SystemExit(f"--billion-of {big} is not among --sizes")
    extra: dict[str, Any] = {"billion_of": big, "plan_rows": args.plan_rows}
    extra["plan"] = _child_result([sys.executable, __file__, "--plan", str(big), str(args.plan_rows)])
    extra["assign"] = _child_result([sys.executable, __file__, "--assign", str(big), str(args.plan_rows)])
    write_result(sizes, images, started, extra)
    few = ["--per-identity", str(args.few_per_identity)]
    subprocess.run([sys.executable, __file__, "--generate", str(big), *few], check=True)
    extra["few_identities"] = _child_result([sys.executable, __file__, "--one", str(big), *few])
    write_result(sizes, images, started, extra)
    print(json.dumps(extra), flush=True)


def summarise_billion(sizes: dict[int, dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """The 1e9-design figures: assignment cost with 1e9's cells, the 1e9 plan, clean with many identities."""
    out: dict[str, Any] = {}
    if "assign" in extra:
        own, big = extra["assign"]["own"]["s_per_mrow"], extra["assign"]["sizing"]["s_per_mrow"]
        out.update(assign_s_per_mrow_1e7=own, assign_s_per_mrow_cells_1e9=big,
                   assign_cost_ratio_1e9_cells=round(big / own, 3))
    if "plan" in extra:
        out.update(plan_s_1e9=extra["plan"]["plan_s"], plan_peak_mib_1e9=extra["plan"]["plan_peak_mib"])
    if "few_identities" in extra:
        many, few = sizes[extra["billion_of"]]["clean_s"], extra["few_identities"]["clean_s"]
        out.update(clean_s_1e6_identities=many, clean_s_1e4_identities=few, clean_ratio_many_identities=round(many / few, 3))
    return out


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """Each target with its figure and whether it is met (None: not measured in this run)."""
    out = {}
    for key, (op, bound) in TARGETS.items():
        value = summary.get(key)
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        out[key] = {"target": f"{op} {bound}", "value": value, "met": met}
    return out


def write_result(sizes: dict[int, dict[str, Any]], images: dict[str, Any] | None, started: str,
                 extra: dict[str, Any]) -> None:
    ordered = [sizes[k] for k in sorted(sizes)]
    summary = {**summarise(ordered), **summarise_billion(sizes, extra)} if ordered else {}
    OUT.write_text(json.dumps({**run_provenance(), "machine": machine(), "run_started": started, "eps": EPS,
                               "ui_share": UI_SHARE, **summary, "targets": targets(summary), "image_path": images,
                               "sizes": ordered, "billion": extra}, indent=2) + "\n")


def machine() -> dict[str, Any]:
    import pyspark

    return {"cores": os.cpu_count(), "python": platform.python_version(), "pyspark": pyspark.__version__,
            "master": "local[*]", "platform": platform.platform()}


if __name__ == "__main__":
    main()
