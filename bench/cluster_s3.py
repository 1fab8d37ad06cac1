"""Hosts that share no disk with an S3 store vs local[2] with a local lake: per-stage seconds, same input.

    python bench/cluster_s3.py [--out bench/results/cluster_s3.json]     (root: it makes namespaces)

Input: the shared ORL crops (400 grey 92x112 PGM files, 40 people) and one degraded copy of each
(blur, low resolution, darkness, occlusion, motion, noise in turn; unlabelled) as one Parquet table
(path, identity, bytes), built in code. Both runs go through ``deploy/ers-submit`` with the jars of
``deploy/fetch_jars.sh`` (Delta, S3A, the LogStore) and run ``jobs/run.py`` (ingest ... clean), then
``jobs/evaluate.py``, ``jobs/report.py`` and ``jobs/maintain.py`` in one application
(``tests/job_batch.py``):

- ``multi_host_s3``: tests/multi_host.py's cluster (master, two workers of two slots, a driver, each a
  host of its own) with input, tables, checkpoints and report on Versity's S3 gateway;
- ``local``: ``--master local[2]`` on this machine with input and lake on local disk.

Seconds per stage are the stages' own JSON records (``seconds``). ``tables_equal`` is computed by
reading both lakes in one session and comparing them table by table (exact columns with chispa,
embeddings and ERS within 1e-5), not assumed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from lake_compare import lakes_equal  # noqa: E402
from provenance import run_provenance  # noqa: E402  (bench/, beside this script)
from multi_host import REPO, MultiHostCluster, missing_requirements  # noqa: E402
from test_multi_host import _config, _jars_dir, _model_dir, _store_conf, _submit_args, _submit_env, _upload  # noqa: E402

ORL = ROOT.parent / "shared" / "data" / "orl_faces"
JOBS = ("run", "evaluate", "report", "maintain")


def _png(pixels) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def orl_parquet(folder: Path) -> Path:
    """Each ORL crop as it is (labelled) and one degraded copy of it (unlabelled), so there is a UI to find."""
    import numpy as np

    from ers_spark.core.synthetic import DEGRADATIONS, degrade

    rng = np.random.default_rng(0)
    rows = []
    for person in sorted(ORL.glob("s*")):
        for k, image in enumerate(sorted(person.glob("*.pgm"))):
            pixels = np.asarray(Image.open(image).convert("L"))
            rows.append({"path": f"{person.name}/{image.name}", "identity": person.name, "bytes": _png(pixels)})
            kind = DEGRADATIONS[k % len(DEGRADATIONS)]
            rows.append({"path": f"degraded/{person.name}_{image.stem}_{kind}.png", "identity": None,
                         "bytes": _png(degrade(pixels, kind, rng))})
    path = folder / "orl.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def batch_steps(config: Path, *extra: str) -> str:
    return json.dumps([{"script": str(REPO / "jobs" / f"{job}.py"), "args": ["--config", str(config), *extra]}
                       for job in JOBS])


def stage_seconds(stdout: str) -> tuple[dict[str, float], list[int]]:
    batch = [json.loads(line[6:]) for line in stdout.splitlines() if line.startswith("BATCH ")]
    seconds: dict[str, float] = {}
    for step in batch:
        for record in step["records"]:
            seconds[record["stage"]] = seconds.get(record["stage"], 0.0) + float(record["seconds"])
    return seconds, [step["exit"] for step in batch]


def run_local(config: Path, jars: Path, zip_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "ERS_SPARK_JARS_DIR": str(jars), "ERS_SPARK_ZIP": str(zip_path), "PYSPARK_PYTHON": sys.executable}
    started = time.perf_counter()
    proc = subprocess.run([str(REPO / "deploy" / "ers-submit"), "--master", "local[2]", "--driver-memory", "2g",
                           str(REPO / "tests" / "job_batch.py"), batch_steps(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    return proc, time.perf_counter() - started


def run_multi_host(cluster: MultiHostCluster, config: Path, jars: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = cluster.hosts["driver"].run(
        _submit_args(cluster, "driver", str(REPO / "tests" / "job_batch.py"), batch_steps(config)),
        env=_submit_env(cluster, jars), timeout=3600)
    return proc, time.perf_counter() - started


def compare(cluster: MultiHostCluster, remote_root: str, local_root: Path, jars: Path) -> dict[str, bool]:
    """Read both lakes in one session and compare them table by table."""
    from ers_spark.config import load_config
    from ers_spark.runtime.session import build_session

    cfg = load_config(overrides=["spark.master=local[1]", f"spark.jars_dir={jars}", "spark.hive_metastore=false",
                                 f"storage.root={local_root.parent / 'compare'}"])
    spark = build_session(cfg, "bench-compare")
    _store_conf(spark, cluster)
    equal = lakes_equal(spark, remote_root, local_root)
    spark.stop()
    return equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster_s3.json"))
    args = parser.parse_args()
    reason = missing_requirements()
    if reason or not ORL.is_dir():
        sys.exit(f"cluster_s3: cannot run here: {reason or f'{ORL} is absent'}")
    jars, model_dir = _jars_dir(), _model_dir()
    work = Path(tempfile.mkdtemp(prefix="ers-bench-s3-"))
    shared = Path(f"/var/tmp/ers-bench-s3-{os.getpid()}")
    cluster = MultiHostCluster(root=work / "cluster", shared=shared)
    try:
        shared.mkdir(parents=True)
        subprocess.run([str(REPO / "deploy" / "package.sh"), str(shared)], check=True, cwd=REPO, capture_output=True)
        cluster.start(model_dir)
        local_input = orl_parquet(work)
        settings = {"ingest": {"input_format": "parquet", "path_column": "path", "identity_column": "identity"},
                    "locate_ui": {}}
        bucket_root = f"s3a://{cluster.bucket}/bench"
        store_cfg = _config(cluster, bucket_root) | {"ingest": {**settings["ingest"], "input_path": f"{bucket_root}/input/orl.parquet"}}
        store_cfg.pop("locate_ui")
        store_config = shared / "store.yaml"
        store_config.write_text(__import__("yaml").safe_dump(store_cfg))
        local_lake = work / "local" / "lake"
        local_config = work / "local.yaml"
        local_config.write_text(__import__("yaml").safe_dump({
            "spark": {"packages": ["delta", "s3a"], "checkpoint_dir": str(work / "local" / "ckpt"), "hive_metastore": False,
                      "shuffle_partitions": 4},
            "storage": {"root": str(local_lake), "database": "ers_bench_local"},
            "ingest": {**settings["ingest"], "input_path": str(local_input)},
            "embed": {"model_cache_dir": str(model_dir)}}))
        # the input goes into the store through S3A (the compare session's connector)
        from ers_spark.config import load_config
        from ers_spark.runtime.session import build_session

        upload = build_session(load_config(overrides=["spark.master=local[1]", f"spark.jars_dir={jars}",
                                                      "spark.hive_metastore=false", f"storage.root={work / 'up'}"]), "upload")
        _store_conf(upload, cluster)
        _upload(upload, local_input, f"{bucket_root}/input/orl.parquet")
        upload.stop()
        remote_proc, remote_wall = run_multi_host(cluster, store_config, jars)
        local_proc, local_wall = run_local(local_config, jars, shared / "ers_spark.zip")
        remote_s, remote_exit = stage_seconds(remote_proc.stdout)
        local_s, local_exit = stage_seconds(local_proc.stdout)
        if remote_exit != [0] * len(JOBS) or local_exit != [0] * len(JOBS):
            errors = [line for proc in (remote_proc, local_proc) for line in (proc.stdout + proc.stderr).splitlines()
                      if line.startswith("error: ")]
            sys.exit(f"cluster_s3: a run failed: multi-host {remote_exit}, local {local_exit}\n" + "\n".join(errors))
        equal = compare(cluster, f"{bucket_root}/lake", local_lake, jars)
    finally:
        cluster.stop()
        shutil.rmtree(shared, ignore_errors=True)
    stages = {name: {"multi_host_s3_s": round(remote_s[name], 2), "local_s": round(local_s.get(name, 0.0), 2),
                     "ratio_multi_host_to_local": round(remote_s[name] / local_s[name], 2) if local_s.get(name) else None}
              for name in remote_s}
    result = {
        "benchmark": "cluster_s3", **run_provenance(),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "input": {"source": "shared ORL crops and one degraded copy of each (unlabelled)", "rows": 800,
                  "identities": 40, "format": "parquet (png bytes)"},
        "multi_host": {"hosts": ["master", "worker1", "worker2", "driver"], "worker_slots": 2, "executor_memory": "1g",
                       "spark.cores.max": 2, "store": "versitygw (posix backend) on the bridge"},
        "local": {"master": "local[2]", "lake": "local disk"},
        "stages": stages,
        "wall_s": {"multi_host_s3": round(remote_wall, 1), "local": round(local_wall, 1),
                   "ratio_multi_host_to_local": round(remote_wall / local_wall, 2)},
        "tables_compared": equal,
        "tables_equal": all(equal.values()),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
