"""Scale benchmark: bring-your-own embeddings at 1e5 .. 1e7 rows through import, locate-ui, score, clean.

Usage::

    python bench/scale.py                          # sizes 1e5, 1e6, 1e7
    python bench/scale.py --sizes 100000,1000000   # a subset (the JSON keeps earlier sizes)

Each size runs in its own child process (``--one N``), so the driver's peak RSS is measured per
size: the Python driver's ``ru_maxrss`` and the peak RSS of its JVM (Spark ``local[2]``, so the
JVM also holds the executors' memory). The input is the vMF generator of
:mod:`ers_spark.core.synthetic` (10 images per identity, 10 % UI, seed 0) written as a Parquet
table of (id, vector, identity); ``ers-spark import-embeddings`` reads it. eps is fixed at 0.4.

In the same child, the single-process baseline a user would otherwise run: faiss ``IndexIVFFlat``
kNN (k = 10, nprobe 8, nlist = 4 sqrt(n)) over all rows, links with cosine >= 1 - eps, scipy
connected components. At 1e5 the exact single linkage at eps (all pairs, blocked, one process)
is the reference for Jaccard and UIC cosine; at every size the planted UI is too.

The image path (``bench/image_path.py``): ingest + embed of ``--image-crops`` JPEG crops (ORL
variants) from one Parquet file, with today's code and with the code before issue 13 (a detached
worktree of ``image_path.OLD_COMMIT``), each in its own child, images per second per core.

Writes ``bench/results/scale.json`` after every size.
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

OUT = ROOT / "bench" / "results" / "scale.json"
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


def write_input(n: int, path: Path) -> tuple[np.ndarray, float]:
    """The generator's rows as Parquet (id, vector, identity); returns the planted UI's unit sum direction."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ers_spark.core.synthetic import iter_vmf_chunks

    n_identities = int(round(n * (1 - UI_SHARE) / PER_IDENTITY))
    ui_sum = None
    start = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    offset = 0
    for part, (x, labels) in enumerate(iter_vmf_chunks(n_identities, PER_IDENTITY, ui_share=UI_SHARE, seed=0,
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


def planted_ui_ids(n: int) -> np.ndarray:
    """Row numbers of the planted UI (label < 0), in generator order."""
    from ers_spark.core.synthetic import vmf_layout

    labels = vmf_layout(int(round(n * (1 - UI_SHARE) / PER_IDENTITY)), PER_IDENTITY, UI_SHARE, 0)
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


def _quality(n: int, root: Path, result: dict[str, Any], members: np.ndarray, uic: np.ndarray) -> dict[str, Any]:
    """UI figures against the planted UI; members and UIC saved for the baselines' own process."""
    from ers_spark.core.linkage import jaccard

    np.save(root / "members.npy", members)
    np.save(root / "uic.npy", uic)
    result["ui_members"] = int(members.size)
    result["jaccard_vs_planted"] = round(jaccard(members, planted_ui_ids(n)), 6)
    result["uic_cos_vs_planted"] = round(float(uic @ np.load(root / "planted_uic.npy")), 6)
    result["pair_comparisons"] = int(result["locate_ui_counts"].get("pair_comparisons", 0))
    return result


def one_size(n: int) -> dict[str, Any]:
    """The Spark stages at size n (one JVM), then the UI they stored; the baselines run in another process."""
    from ers_spark.config import load_config

    root = WORK / str(n)
    result: dict[str, Any] = {"n": n, "generate_s": json.loads((root / "generate.json").read_text())["generate_s"]}
    with JvmPeakRss() as jvm:
        cfg = load_config(overrides=overrides(n, root, root / "input"))
        result.update(run_stages(cfg))
        result["driver_python_peak_mib"] = round(python_peak_mib(), 1)  # before the benchmark's own collects below
        result["driver_jvm_peak_mib"] = round(jvm.peak / 2**20, 1)
        members, uic = stored_ui(cfg, result.pop("uic_id"))
    return _quality(n, root, result, members, uic)


def recover_size(n: int) -> dict[str, Any]:
    """The Spark part of size n from its progress file and the lake, when its child died after the stages.

    Driver peak RSS is not known then (it is printed only by a child that finishes), so it is None.
    """
    from ers_spark.config import load_config

    root = WORK / str(n)
    result: dict[str, Any] = {"n": n, "generate_s": json.loads((root / "generate.json").read_text())["generate_s"]}
    result.update(json.loads((WORK / "progress.json").read_text()))
    missing = [f"{k}_s" for k in ("import", "locate_ui", "score", "clean") if f"{k}_s" not in result]
    if missing:
        raise SystemExit(f"size {n}: the progress file lacks {missing}; run the size again")
    result.update(driver_python_peak_mib=None, driver_jvm_peak_mib=None,
                  recovered="stage figures from the progress file: the child was killed after its Spark stages")
    members, uic = stored_ui(load_config(overrides=overrides(n, root, root / "input")), result.pop("uic_id"))
    return _quality(n, root, result, members, uic)


def baselines_of_size(n: int) -> dict[str, Any]:
    """The single-process baselines at size n, in a process without a JVM (they need most of the memory)."""
    root = WORK / str(n)
    return baselines(n, root, np.load(root / "members.npy"), np.load(root / "uic.npy"))


def generate(n: int) -> None:
    """Write the input table in its own process, so its memory is not the driver's peak."""
    root = WORK / str(n)
    shutil.rmtree(root, ignore_errors=True)
    planted_uic, generate_s = write_input(n, root / "input")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--image-crops", type=int, default=100_000, help="crops for the image path (0: skip it)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--baselines", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--recover-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--recover", type=int, default=None, help="finish size N whose child was killed after its "
                        "Spark stages: figures from the progress file and the lake, then the baselines")
    parser.add_argument("--generate", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate is not None:
        generate(args.generate)
        return
    for flag, fn in ((args.one, one_size), (args.baselines, baselines_of_size), (args.recover_child, recover_size)):
        if flag is not None:
            print("RESULT " + json.dumps(fn(flag)), flush=True)
            return
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    sizes = {s["n"]: s for s in previous.get("sizes", [])}
    if args.recover is not None:  # the run that measured the stages started earlier; keep its start time
        n = args.recover
        sizes[n] = {**_child_result([sys.executable, __file__, "--recover-child", str(n)]),
                    "run_started": previous.get("run_started"), "baselines_started": started}
        sizes[n].update(_child_result([sys.executable, __file__, "--baselines", str(n)]))
        write_result(sizes, previous.get("image_path"), previous.get("run_started", started))
        return
    # a new run: nothing of an earlier run's file is kept (only --recover above continues the run it names)
    sizes = {}
    images = {**image_path(args.image_crops), "run_started": started} if args.image_crops else None
    write_result(sizes, images, started)
    for n in (int(s) for s in args.sizes.split(",") if s):
        subprocess.run([sys.executable, __file__, "--generate", str(n)], check=True)
        sizes[n] = {**_child_result([sys.executable, __file__, "--one", str(n)]), "run_started": started}
        sizes[n].update(_child_result([sys.executable, __file__, "--baselines", str(n)]))
        write_result(sizes, images, started)
        print(json.dumps(sizes[n]), flush=True)


def write_result(sizes: dict[int, dict[str, Any]], images: dict[str, Any] | None, started: str) -> None:
    ordered = [sizes[k] for k in sorted(sizes)]
    OUT.write_text(json.dumps({**run_provenance(), "machine": machine(), "run_started": started, "eps": EPS, "ui_share": UI_SHARE,
                               **summarise(ordered), "image_path": images, "sizes": ordered}, indent=2) + "\n")


def machine() -> dict[str, Any]:
    import pyspark

    return {"cores": os.cpu_count(), "python": platform.python_version(), "pyspark": pyspark.__version__,
            "master": "local[*]", "platform": platform.platform()}


if __name__ == "__main__":
    main()
