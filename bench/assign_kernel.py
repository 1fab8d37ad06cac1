"""locate-ui's assignment kernel outside Spark: what a chunk of rows costs with a 1e7 table's plan and a 1e9 one's.

    python bench/assign_kernel.py [--out bench/results/assign_kernel.json]

``scale.py`` measures the assignment pass in Spark (``assign_cost_ratio_1e9_cells``); this script splits one chunk
of ``ASSIGN_CHUNK_ROWS`` unit rows (d = 128) into its two steps, on synthetic plans shaped like the scale run's
(4096 top cells; the 1e7 plan cuts 178 of them into 40 sub-centres each, the 1e9 plan cuts all 4096 into 120):

- ``top_s``: :func:`~ers_spark.core.cells.nearest_cells` (faiss, k = nprobe of 4096 centres);
- ``sub_s_1e7_plan`` / ``sub_s_1e9_plan``: :func:`~ers_spark.core.cells.group_memberships` on those cells;
- ``gflops``: the arithmetic of each step (2 x rows x inner products x d) over its time;
- ``side_by_side``: two processes at once, as Spark's two tasks run on the two cores, top + sub per chunk.

Each time is the minimum and the median of ``--repeats`` runs; faiss and BLAS run on one thread, as in a task.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as Spark sets it in a Python worker: before numpy loads BLAS
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from provenance import run_provenance, write_result  # noqa: E402

from ers_spark.core.cells import group_memberships, nearest_cells, plan_from_sub_centres  # noqa: E402
from ers_spark.core.clustering import faiss_module  # noqa: E402
from ers_spark.distributed.cells import ASSIGN_CHUNK_ROWS  # noqa: E402

DIM, CELLS, NPROBE = 128, 4096, 2
PLANS = {"1e7_plan": (178, 40), "1e9_plan": (CELLS, 120)}  # (cut cells, sub-centres each)


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _setup(seed: int) -> tuple[np.ndarray, dict[str, Any], np.random.Generator]:
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((CELLS, DIM)))
    plans = {name: plan_from_sub_centres(CELLS, {c: _unit(centres[c] + 0.05 * rng.standard_normal((k, DIM)))
                                                 for c in range(cut)})
             for name, (cut, k) in PLANS.items()}
    return centres, plans, np.random.default_rng(seed)


def _chunk(centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rows = centres[rng.integers(0, CELLS, ASSIGN_CHUNK_ROWS)]
    return _unit(rows + 0.08 * rng.standard_normal(rows.shape))


def one_process(repeats: int) -> dict[str, Any]:
    """Per-step seconds of one chunk: min and median over ``repeats`` fresh chunks."""
    faiss_module().omp_set_num_threads(1)
    centres, plans, rng = _setup(1)
    times: dict[str, list[float]] = {"top_s": [], **{f"sub_s_{n}": [] for n in plans}}
    entries = {}
    for _ in range(repeats):
        x = _chunk(centres, rng)
        start = time.perf_counter()
        near = nearest_cells(x, centres, NPROBE)
        times["top_s"].append(time.perf_counter() - start)
        for name, plan in plans.items():
            start = time.perf_counter()
            rows, _ = group_memberships(x, near, plan, NPROBE)
            times[f"sub_s_{name}"].append(time.perf_counter() - start)
            entries[name] = int(rows.size)
    out: dict[str, Any] = {k: {"min": round(min(v), 4), "median": round(float(np.median(v)), 4)} for k, v in times.items()}
    top_flop = 2.0 * ASSIGN_CHUNK_ROWS * CELLS * DIM
    sub_flop = 2.0 * ASSIGN_CHUNK_ROWS * NPROBE * PLANS["1e9_plan"][1] * DIM  # every row in nprobe cut cells
    out["gflops"] = {"top": round(top_flop / 1e9 / out["top_s"]["min"], 1),
                     "sub_1e9_plan": round(sub_flop / 1e9 / out["sub_s_1e9_plan"]["min"], 1)}
    out["arithmetic_ratio_1e9_plan"] = round((top_flop + sub_flop) / top_flop, 3)
    out["ratio_in_process"] = round((out["top_s"]["min"] + out["sub_s_1e9_plan"]["min"])
                                    / (out["top_s"]["min"] + out["sub_s_1e7_plan"]["min"]), 3)
    out["entries_per_chunk"] = entries
    return out


def side_by_side_child(seed: int, chunks: int) -> dict[str, float]:
    """Top + sub seconds per chunk for each plan, alternating plans chunk by chunk."""
    faiss_module().omp_set_num_threads(1)
    centres, plans, rng = _setup(seed)
    spent = {name: 0.0 for name in plans}
    for _ in range(chunks):
        for name, plan in plans.items():
            x = _chunk(centres, rng)
            start = time.perf_counter()
            group_memberships(x, nearest_cells(x, centres, NPROBE), plan, NPROBE)
            spent[name] += time.perf_counter() - start
    return {name: round(s / chunks, 4) for name, s in spent.items()}


def side_by_side(chunks: int) -> dict[str, Any]:
    """Two child processes at once (the two cores), each timing its own chunks."""
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(seed), str(chunks)], stdout=subprocess.PIPE,
                              text=True) for seed in (2, 3)]
    results = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"assign_kernel: a side-by-side child failed with exit {proc.returncode}")
        results.append(json.loads(stdout))
    per_plan = {name: round(float(np.mean([r[name] for r in results])), 4) for name in PLANS}
    return {"s_per_chunk": per_plan, "ratio": round(per_plan["1e9_plan"] / per_plan["1e7_plan"], 3),
            "children": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "assign_kernel.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=6, help="chunks per plan in each side-by-side process")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(side_by_side_child(*args.child)))
        return
    result: dict[str, Any] = {"benchmark": "assign_kernel", **run_provenance(), "chunk_rows": ASSIGN_CHUNK_ROWS,
                              "dim": DIM, "cells": CELLS, "nprobe": NPROBE,
                              "plans": {n: {"cut_cells": c, "sub_centres_each": k} for n, (c, k) in PLANS.items()}}
    result["one_process"] = one_process(args.repeats)
    result["side_by_side"] = side_by_side(args.chunks)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
