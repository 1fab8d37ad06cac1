"""What a 1e9-row table costs per stage, from ``scale.json``'s measurements plus one measured pass of shuffle bytes.

Usage::

    python bench/plan_1e9.py          # after bench/scale.py; ~5 min (the four stages at 1e6 rows, once)

``scale.json`` gives the seconds of each stage at 1e7 rows on ``cores`` cores, the growth exponent of each stage
from 1e6 to 1e7, and the plan a 1e9-row table gets (cells, sub-cells, its driver time and memory). What it does not
measure is the bytes each stage shuffles: this script runs the same four stages (import-embeddings, locate-ui,
score, clean) on scale.py's 1e6-row input in a lake of its own and reads Spark's own per-stage shuffle write bytes
(the application status store, which Spark keeps with its UI off) after each stage. Every stage of the design sends
a row a bounded number of times (locate-ui: ``nprobe`` memberships per row at 1e6 as at 1e9), so bytes per row
carry over to 1e9.

Per stage at ``ROWS`` = 1e9: ``core_hours_linear`` = seconds at 1e7 x cores x 100 / 3600 (the cost per row measured at
1e7 kept flat, what the design claims) and ``core_hours_at_measured_growth`` = the same with 100 raised to the stage's
measured 1e6 -> 1e7 exponent where it is above 1 (what the figures say if their growth continued); ``shuffle_gib`` = measured bytes per
row x 1e9. The plan's driver side: its seconds and Python peak, the centres every Python worker receives
(``plan_broadcast_mib``: 4096 cells and the sub-centres, 128-D float32) and the rows of the executors' sizing sample.

Writes ``bench/results/plan_1e9.json``: this run's own provenance, and ``source`` (scale.json's commit and
``run_started``) for the figures it takes from there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from provenance import run_provenance, write_result  # noqa: E402
from scale import STAGES, WORK, generate, overrides, size_root  # noqa: E402

SCALE_JSON = ROOT / "bench" / "results" / "scale.json"
OUT = ROOT / "bench" / "results" / "plan_1e9.json"
ROWS = 1_000_000_000
MEASURE_ROWS = 1_000_000
DIM = 128


def stage_shuffle_bytes(spark: Any) -> dict[tuple[int, int], int]:
    """Shuffle write bytes of each (stage, attempt) Spark's status store holds (kept with the UI off too)."""
    jvm, empty = spark.sparkContext._jvm, spark.sparkContext._jvm.java.util.ArrayList
    no_quantiles = spark.sparkContext._gateway.new_array(jvm.double, 0)
    stages = spark.sparkContext._jsc.sc().statusStore().stageList(empty(), False, False, no_quantiles, empty())
    out = {}
    for i in range(stages.size()):
        stage = stages.apply(i)
        out[(int(stage.stageId()), int(stage.attemptId()))] = int(stage.shuffleWriteBytes())
    return out


def measured_shuffle(n: int) -> dict[str, dict[str, Any]]:
    """Each stage's shuffle write bytes on scale.py's n-row input, in a lake of this script's own."""
    from ers_spark.config import load_config
    from ers_spark.pipeline import stage_runner
    from ers_spark.runtime.session import build_session

    data = size_root(n) / "input"
    if not data.exists():
        generate(n)
    root = WORK / f"plan-shuffle-{n}"
    shutil.rmtree(root, ignore_errors=True)
    # bytes do not depend on memory: a smaller driver than scale.py's leaves room for a run beside it
    cfg = load_config(overrides=[*overrides(n, root, data), "spark.driver_memory=4g"])
    spark = build_session(cfg, "plan-1e9")
    out: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[int, int], int] = {}
    for stage in STAGES:
        stage_runner(stage)(spark, cfg)
        new = {key: b for key, b in stage_shuffle_bytes(spark).items() if key not in seen}  # this stage's Spark stages
        seen.update(new)
        out[stage] = {"shuffle_bytes": sum(new.values()), "shuffle_bytes_per_row": round(sum(new.values()) / n, 1),
                      "spark_stages": len(new)}
    spark.stop()
    shutil.rmtree(root, ignore_errors=True)
    return out


def per_stage(scale: dict[str, Any], shuffle: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Core-hours and shuffle of each stage at ROWS, from the largest measured size and the shuffle per row."""
    big = max(scale["sizes"], key=lambda s: s["n"])
    factor, cores = ROWS / big["n"], scale["machine"]["cores"]
    out = {}
    for stage in STAGES:
        key = stage.replace("-", "_").replace("import_embeddings", "import")
        seconds = big[f"{key}_s"]
        growth = scale.get(f"growth_exponent_1e6_1e7_{key}", 1.0)
        out[stage] = {
            "seconds_at_measured": seconds, "measured_rows": big["n"], "growth_exponent_1e6_1e7": growth,
            "core_hours_linear": round(seconds * cores * factor / 3600, 1),
            # an exponent under 1 at these sizes is fixed cost being spread, not a cost per row that keeps falling
            "core_hours_at_measured_growth": round(seconds * cores * factor ** max(growth, 1.0) / 3600, 1),
            "shuffle_bytes_per_row": shuffle[stage]["shuffle_bytes_per_row"],
            "shuffle_gib": round(shuffle[stage]["shuffle_bytes_per_row"] * ROWS / 2**30, 1),
        }
    return out


def driver_side(scale: dict[str, Any]) -> dict[str, Any]:
    """The 1e9 plan's cells and what the driver and every Python worker hold for it."""
    plan = scale["billion"]["plan"]
    sub_centres = plan["groups"] - (plan["cells"] - plan["cut_cells"])
    return {"cells": plan["cells"], "cut_cells": plan["cut_cells"], "groups": plan["groups"],
            "sub_centres": sub_centres, "plan_s": plan["plan_s"], "plan_peak_mib": plan["plan_peak_mib"],
            "plan_jvm_peak_mib": plan["jvm_peak_mib"],
            "plan_broadcast_mib": round((plan["cells"] + sub_centres) * DIM * 4 / 2**20, 1),
            "sizing_sample_rows_1e9": round(plan["sub_sample_share"] * plan["n"] * ROWS / plan["sizing_rows"]),
            "driver_python_peak_mib_1e7": max(s["driver_python_peak_mib"] for s in scale["sizes"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale-json", type=Path, default=SCALE_JSON)
    parser.add_argument("--measure-rows", type=int, default=MEASURE_ROWS, help="rows of the shuffle-measuring run")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    scale = json.loads(args.scale_json.read_text())
    shuffle = measured_shuffle(args.measure_rows)
    stages = per_stage(scale, shuffle)
    result = {**run_provenance(), "rows": ROWS, "shuffle_measured_rows": args.measure_rows,
              "source": {"file": str(args.scale_json.relative_to(ROOT) if args.scale_json.is_relative_to(ROOT)
                                     else args.scale_json), "commit": scale["commit"],
                         "run_started": scale["run_started"]},
              "stages": stages, "driver": driver_side(scale),
              "core_hours_linear_total": round(sum(s["core_hours_linear"] for s in stages.values()), 1),
              "core_hours_at_measured_growth_total": round(
                  sum(s["core_hours_at_measured_growth"] for s in stages.values()), 1),
              "shuffle_gib_total": round(sum(s["shuffle_gib"] for s in stages.values()), 1),
              "shuffle_run": shuffle}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
