"""ers-spark on hosts that share no disk, with every table, checkpoint, input and report in an S3 store.

A master, two workers and a driver, each a host of its own (tests/multi_host.py: network and mount
namespaces on a bridge), and Versity's S3 gateway on the bridge. The driver submits through
``deploy/ers-submit`` with the jars ``deploy/fetch_jars.sh`` fetched (S3A among them) and a config
whose S3A endpoint and credentials are config keys; the tables it leaves must equal the local[2]
run of the same input (the test session's demo lake). Its first application runs every ``jobs/*.py``
and the model faults (each worker host has two fake GPUs); the second, the host and store faults.

Marked ``multihost``: README's test command leaves it out (suite time), ``.ci/run`` runs it after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import DEMO_INPUT
from ers_spark.versions import PACKAGES
from lake_compare import assert_lakes_equal
from multi_host import REPO, MultiHostCluster, missing_requirements

pytestmark = [pytest.mark.multihost, pytest.mark.spark]

CACHE = Path(os.environ.get("ERS_TEST_CACHE", Path.home() / ".cache" / "ers-spark"))
S3_PACKAGES = ["delta", "s3a"]
STAGES = ["ingest", "embed", "locate-ui", "score", "clean"]
# the demo lake's settings (tests/conftest.py), so both runs make the same decisions
DEMO_SETTINGS = {"locate_ui": {"kmeans_cells": 4}, "ingest": {"input_format": "parquet", "path_column": "path",
                                                                "identity_column": "identity"}}


def _jars_dir() -> Path:
    """deploy/fetch_jars.sh's folder for Delta + S3A, fetched once per pinned set (Maven Central, on this host)."""
    pinned = ",".join(PACKAGES[name] for name in S3_PACKAGES)
    folder = CACHE / f"jars-{hashlib.sha256(pinned.encode()).hexdigest()[:12]}"
    if not any(folder.glob("*.jar")):
        config = folder.with_suffix(".yaml")
        folder.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump({"spark": {"packages": S3_PACKAGES}}))
        subprocess.run([str(REPO / "deploy" / "fetch_jars.sh"), str(folder), str(config)], check=True, cwd=REPO,
                       capture_output=True, timeout=900)
    return folder


def _model_dir() -> Path:
    """The builtin model converted once on this host; the driver host mounts it read-only (a model volume)."""
    from ers_spark.models.dlib_convert import ensure_builtin_onnx

    folder = CACHE / "multi-host-models"
    ensure_builtin_onnx(folder)
    return folder


def _config(cluster: MultiHostCluster, bucket_root: str) -> dict:
    return {
        "spark": {"packages": S3_PACKAGES, "checkpoint_dir": f"{bucket_root}/checkpoints", "hive_metastore": False,
                  "shuffle_partitions": 4,
                  "conf": {**cluster.s3a_conf(), "spark.ui.enabled": "false",
                           "spark.delta.logStore.s3a.impl": "io.ersspark.delta.S3ConditionalLogStore"}},
        "storage": {"root": f"{bucket_root}/lake", "database": "ers_multi_host", "warehouse_dir": f"{bucket_root}/warehouse"},
        "ingest": {**DEMO_SETTINGS["ingest"], "input_path": f"{bucket_root}/input/{DEMO_INPUT}"},
        "locate_ui": DEMO_SETTINGS["locate_ui"],
        "embed": {"model_cache_dir": "/tmp/models"},  # read-only on the driver host
        "report": {"path": None},  # <storage.root>/report.html, in the store
    }


def _store_conf(spark, cluster: MultiHostCluster) -> None:
    """Let the test session read and write the store's bucket (per-bucket S3A keys, this bucket only)."""
    hadoop = spark._jsc.hadoopConfiguration()
    for key, value in cluster.s3a_conf().items():
        hadoop.set(key.removeprefix("spark.hadoop.").replace("fs.s3a.", f"fs.s3a.bucket.{cluster.bucket}.", 1), value)


def _upload(spark, local: Path, uri: str) -> None:
    jvm = spark._jvm
    target = jvm.org.apache.hadoop.fs.Path(uri)
    target.getFileSystem(spark._jsc.hadoopConfiguration()).copyFromLocalFile(jvm.org.apache.hadoop.fs.Path(str(local)), target)


@pytest.fixture(scope="module")
def multi_host(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    model_dir, jars = _model_dir(), _jars_dir()
    # what every host may read, as an image or a config map gives it: configs, the code zip, jars (not under /tmp)
    shared = Path(f"/var/tmp/ers-multi-host-{os.getpid()}")
    cluster = MultiHostCluster(root=tmp_path_factory.mktemp("multi_host"), shared=shared)
    try:
        shared.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(REPO / "deploy" / "package.sh"), str(shared)], check=True, cwd=REPO, capture_output=True)
        yield cluster.start(model_dir), jars
    finally:
        cluster.stop()
        shutil.rmtree(shared, ignore_errors=True)


def _submit_args(cluster: MultiHostCluster, host: str, script: str, *args: str, cores: int = 2) -> list[str]:
    address = cluster.hosts[host].address
    return [str(REPO / "deploy" / "ers-submit"), "--master", cluster.master_url, "--deploy-mode", "client",
            "--conf", f"spark.driver.host={address}", "--conf", "spark.executor.memory=1g",
            "--conf", f"spark.cores.max={cores}", script, *args]


def _submit_env(cluster: MultiHostCluster, jars: Path) -> dict[str, str]:
    return {"ERS_SPARK_JARS_DIR": str(jars), "ERS_SPARK_ZIP": str(cluster.shared / "ers_spark.zip")}


def _mkdirs(spark, uri: str) -> None:
    target = spark._jvm.org.apache.hadoop.fs.Path(uri)
    target.getFileSystem(spark._jsc.hadoopConfiguration()).mkdirs(target)


def _batch(stdout: str) -> list[dict]:
    return [json.loads(line[len("BATCH "):]) for line in stdout.splitlines() if line.startswith("BATCH ")]


# ----------------------------------------------------------------------------- every job script, model faults
# The first application, while both worker hosts live: every jobs/*.py as spark-submit runs it (README's
# ers-submit), the stage scripts one at a time into a store lake that must equal the local run, run / demo /
# maintain again on it (nothing changes), then the model faults. Its executors hold one core and one of their
# worker's (fake) GPUs each, one executor per worker host; a failing task is tried twice, not four times.

STAGE_SCRIPTS = ["ingest", "embed", "locate_ui", "score", "clean"]
RERUN_SCRIPTS = ["run", "demo", "maintain"]
JOB_SCRIPTS = [*STAGE_SCRIPTS, *RERUN_SCRIPTS]
COUNTED = ("crops", "embeddings", "scores", "cleaned")
BROKEN = {"corrupt_file": "cannot load ONNX model", "wrong_input_shape": "has shape", "wrong_output_dim": "-D embeddings"}
FAULT_CASES = [*BROKEN, "cuda", "auto"]
# executors carry one (fake) GPU each; only embed's tasks ask for it (embed.gpus_per_task, a task resource profile)
JOBS_CONF = {"spark.executor.resource.gpu.amount": "1", "spark.task.maxFailures": "2", "spark.executor.cores": "1",
             "spark.eventLog.enabled": "true", "spark.eventLog.compress": "false"}
EMBED_GPUS = ["embed.gpus_per_task=1"]
FAULT_FACES = 40


def _noise_png(seed: int, size: int = 48) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _spec(path: Path, model: Path, **changes) -> Path:
    doc = {"name": "broken", "version": "1", "onnx_path": str(model), "input_height": 112, "input_width": 112,
           "channel_order": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3, "layout": "NCHW", "embedding_dim": 64}
    path.write_text(yaml.safe_dump({**doc, **changes}))
    return path


def _broken_models(folder: Path) -> dict[str, Path]:
    """Model specs the driver host can read (the config map): a corrupt file, a wrong input shape, a wrong dim."""
    from onnx_builders import tiny_embedding_model

    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "corrupt.onnx"
    corrupt.write_bytes(b"this is not an onnx file" * 100)
    good = tiny_embedding_model(folder / "tiny.onnx", size=112, dim=64)
    return {"corrupt_file": _spec(folder / "corrupt.yaml", corrupt),
            "wrong_input_shape": _spec(folder / "shape.yaml", good, input_height=150, input_width=150),
            "wrong_output_dim": _spec(folder / "dim.yaml", good, embedding_dim=128)}


def _job_steps(cluster: MultiHostCluster, config: Path, bucket_root: str, faces: str) -> list[dict]:
    job = lambda name: str(REPO / "jobs" / f"{name}.py")  # noqa: E731
    root = f"{bucket_root}/jobs/lake"
    # explicit keys, not only --config: the demo's own defaults come after a config file and before these
    args = ["--config", str(config), f"storage.root={root}", f"spark.checkpoint_dir={bucket_root}/jobs/checkpoints",
            f"ingest.input_path={bucket_root}/input/{DEMO_INPUT}", "ingest.input_format=parquet",
            "ingest.path_column=path", "ingest.identity_column=identity", *EMBED_GPUS]
    probe = {"probe": root, "tables": list(COUNTED)}
    faults = ["--config", str(config), f"storage.root={bucket_root}/faults/lake", "spark.shuffle_partitions=2",
              *EMBED_GPUS]
    specs = _broken_models(cluster.shared / "broken-models")
    embeds = [[*faults, f"embed.model={specs[case]}"] for case in BROKEN]
    embeds += [[*faults, "embed.device=cuda"], [*faults, "embed.device=auto"]]
    return [*({"script": job(name), "args": args} for name in STAGE_SCRIPTS), probe,
            *({"script": job(name), "args": args} for name in RERUN_SCRIPTS), probe,
            {"script": job("ingest"), "args": [*faults, f"ingest.input_path={faces}", "ingest.input_format=images"]},
            *({"script": job("embed"), "args": a} for a in embeds)]


@pytest.fixture(scope="module")
def store_inputs(spark, demo_lake, multi_host, tmp_path_factory) -> dict:
    """The demo input and a folder of 40 noise faces in the store; the config every driver reads."""
    cluster, _ = multi_host
    _store_conf(spark, cluster)
    bucket_root = f"s3a://{cluster.bucket}/ers"
    local_input = Path(demo_lake[0].ingest.input_path)
    _upload(spark, local_input, f"{bucket_root}/input/{DEMO_INPUT}")
    faces = tmp_path_factory.mktemp("faces")
    for i in range(FAULT_FACES):
        (faces / f"img{i:05d}.png").write_bytes(_noise_png(i))
    _upload(spark, faces, f"{bucket_root}/faults/faces")
    config = cluster.shared / "store.yaml"
    config.write_text(yaml.safe_dump(_config(cluster, bucket_root)))
    return {"bucket_root": bucket_root, "local_input": local_input, "config": config,
            "faces": f"{bucket_root}/faults/faces", "spark": spark}


@pytest.fixture(scope="module")
def jobs_run(multi_host, store_inputs) -> dict:
    """One spark-submit from the driver host (``tests/job_batch.py``) running every job script, then the faults."""
    cluster, jars = multi_host
    steps = _job_steps(cluster, store_inputs["config"], store_inputs["bucket_root"], store_inputs["faces"])
    event_log = f"{store_inputs['bucket_root']}/event-log"  # in the store: the driver host's disk is its own
    _mkdirs(store_inputs["spark"], event_log)
    settings = {**JOBS_CONF, **cluster.s3a_conf(), "spark.eventLog.dir": event_log}
    conf = [arg for key, value in settings.items() for arg in ("--conf", f"{key}={value}")]
    argv = _submit_args(cluster, "driver", str(REPO / "tests" / "job_batch.py"), json.dumps(steps))
    proc = cluster.hosts["driver"].run([*argv[:-2], *conf, *argv[-2:]], env=_submit_env(cluster, jars))
    runs = _batch(proc.stdout)
    assert len(runs) == len(steps), f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    stage_runs, rest = runs[:len(STAGE_SCRIPTS)], runs[len(STAGE_SCRIPTS):]
    before, *reruns, after = rest[:len(RERUN_SCRIPTS) + 2]
    return {"root": f"{store_inputs['bucket_root']}/jobs/lake", "faults_lake": f"{store_inputs['bucket_root']}/faults/lake",
            "records": [r for run in stage_runs for r in run["records"]], "jobs": dict(zip(JOB_SCRIPTS, [*stage_runs, *reruns])),
            "before": before["counts"], "after": after["counts"], "faces": rest[len(RERUN_SCRIPTS) + 2],
            "faults": dict(zip(FAULT_CASES, runs[-len(FAULT_CASES):])), "event_log": event_log}


def _quarantined(spark, root: str, stage: str) -> int:
    from delta.tables import DeltaTable

    if not DeltaTable.isDeltaTable(spark, f"{root}/quarantine"):
        return 0
    return _read(spark, root, "quarantine").where(f"stage = '{stage}'").count()


def test_stage_scripts_on_hosts_equal_the_local_run(spark, demo_lake, jobs_run) -> None:
    """The stage scripts one by one, each its own stage record, leave the tables of the pipeline in local[2]."""
    assert [r["stage"] for r in jobs_run["records"]] == STAGES
    assert_lakes_equal(spark, jobs_run["root"], demo_lake[0].storage.root)


@pytest.mark.parametrize("job", JOB_SCRIPTS)
def test_each_job_script_runs_under_spark_submit(jobs_run, job) -> None:
    """Every jobs/*.py under spark-submit: the stage scripts build the lake, then run, demo and maintain run
    every stage again on it, which changes nothing (re-runs are no-ops)."""
    run = jobs_run["jobs"][job]
    assert run["exit"] == 0, run
    expected = {"run": STAGES, "demo": [*STAGES, "report"], "maintain": ["maintain"]}.get(job)
    assert [r["stage"] for r in run["records"]] == (expected or [STAGES[STAGE_SCRIPTS.index(job)]])
    if job in RERUN_SCRIPTS:
        assert jobs_run["after"] == jobs_run["before"]
        written = {"ingest": "written", "embed": "written", "score": "inserted", "clean": "cleaned_changed"}
        for record in run["records"]:
            if record["stage"] in written:
                assert record["counts"][written[record["stage"]]] == 0, record


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_model_fails_the_job(spark, jobs_run, case) -> None:
    """A broken model: exit 2 with one line naming the problem, nothing quarantined."""
    assert jobs_run["faces"]["exit"] == 0 and jobs_run["faces"]["records"][0]["counts"]["written"] == FAULT_FACES
    run = jobs_run["faults"][case]
    assert run["exit"] == 2, run
    (line,) = run["errors"]
    assert BROKEN[case] in line
    assert _quarantined(spark, jobs_run["faults_lake"], "embed") == 0


def test_cuda_required_but_missing_fails_on_the_executor(spark, jobs_run) -> None:
    """Executor side: Spark gives each task a (fake) GPU, ONNX Runtime here has no CUDA provider,
    embed.device=cuda: the task fails and the job exits 2 in one line; nothing quarantined."""
    run = jobs_run["faults"]["cuda"]
    assert run["exit"] == 2, run
    (line,) = run["errors"]
    assert "CUDAExecutionProvider" in line and "raised on an executor" in line
    assert _quarantined(spark, jobs_run["faults_lake"], "embed") == 0


def test_auto_device_reports_the_fallback_per_task(jobs_run) -> None:
    """embed.device=auto with a (fake) GPU per task: runs on CPU and the run log says so, per task."""
    run = jobs_run["faults"]["auto"]
    assert run["exit"] == 0, run
    (record,) = run["records"]
    devices = record["runtime"]["tasks_by_device"]
    assert devices and all(d.startswith("cpu CPUExecutionProvider (gpu ") for d in devices), devices
    assert record["counts"]["written"] == FAULT_FACES


def test_only_embed_tasks_ask_for_gpus(spark, jobs_run) -> None:
    """embed.gpus_per_task: embed's stages run under a resource profile that asks each task for a GPU, and its
    tasks see their addresses; every other stage runs under the default profile, which asks for none, so the
    executors' GPUs are free whenever embed is not running (Spark's event log, written to the store)."""
    record = jobs_run["jobs"]["embed"]["records"][0]
    by_gpus = record["runtime"]["tasks_by_gpus"]
    assert by_gpus and set(by_gpus) <= {"0", "1"}, by_gpus
    events = [json.loads(row.value) for row in spark.read.text(f"{jobs_run['event_log']}/*").collect()]
    profiles = {e["Resource Profile Id"]: e["Task Resource Requests"] for e in events
                if e["Event"] == "SparkListenerResourceProfileAdded"}
    stages = [e["Stage Info"] for e in events if e["Event"] == "SparkListenerStageSubmitted"]
    gpu_profiles = {pid for pid, tasks in profiles.items() if "gpu" in tasks}
    assert gpu_profiles and 0 not in gpu_profiles, profiles
    assert all(profiles[pid]["gpu"]["Amount"] == 1.0 for pid in gpu_profiles), profiles
    on_gpu = [s for s in stages if s["Resource Profile Id"] in gpu_profiles]
    assert on_gpu, [(s["Stage Name"], s["Resource Profile Id"]) for s in stages]
    assert sum(s["Resource Profile Id"] == 0 for s in stages) > 5 * len(on_gpu), (len(stages), len(on_gpu))


# ----------------------------------------------------------------------------- faults of hosts and the store
RACE_CORRUPT = [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"<html>not an image</html>", b"GIF89a"]


def _pairs_file(spark, local_input: Path, folder: Path, bucket_root: str) -> str:
    """The demo input has one labelled person: evaluate gets its pairs from a file in the store instead
    (astronaut crops with each other, and with 40 other faces), named by source path."""
    import pandas as pd

    paths = pd.read_parquet(local_input, columns=["path"]).path
    same = sorted(p for p in paths if p.startswith("demo/astronaut/"))
    others = sorted(p for p in paths if p.startswith("demo/lfw_faces/"))[:40]
    rows = [(a, b, 1) for i, a in enumerate(same) for b in same[i + 1:]] + [(a, b, 0) for a in same for b in others]
    local = folder / "pairs.csv"
    pd.DataFrame(rows, columns=["left", "right", "label"]).to_csv(local, index=False)
    _upload(spark, local, f"{bucket_root}/pairs/pairs.csv")
    return f"{bucket_root}/pairs/pairs.csv", local


def _race_inputs(spark, local_input: Path, folder: Path, bucket_root: str) -> tuple[str, str, int]:
    """Two overlapping parts of the demo input (same bytes where they overlap) and, in each, two corrupt
    rows (empty, truncated PNG, HTML, a bare GIF header), in the store."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(local_input)  # sliced as Arrow: each part keeps the input's column types
    third = len(rows) // 3
    uris = []
    for k, (name, part) in enumerate((("a", rows.slice(0, 2 * third)), ("b", rows.slice(third)))):
        corrupt = pa.table({"path": [f"corrupt/{name}{i}.png" for i in range(2)], "identity": [None, None],
                            "bytes": RACE_CORRUPT[2 * k:2 * k + 2]}, schema=rows.schema)
        local = folder / f"race_{name}.parquet"
        pq.write_table(pa.concat_tables([part, corrupt]), local)
        uris.append(f"{bucket_root}/race-input/{local.name}")
        _upload(spark, local, uris[-1])
    return uris[0], uris[1], len(rows) + len(RACE_CORRUPT)


@pytest.fixture(scope="module")
def store_run(spark, demo_lake, multi_host, store_inputs, tmp_path_factory):
    """From the driver host, one application: an ingest racing the other driver host's ingest into one
    store table, the LogStore probe, then run, evaluate, report and maintain on the demo input."""
    cluster, jars = multi_host
    bucket_root = store_inputs["bucket_root"]
    local_cfg = demo_lake[0]
    race_a, race_b, race_rows = _race_inputs(spark, Path(local_cfg.ingest.input_path),
                                             tmp_path_factory.mktemp("race"), bucket_root)
    pairs, local_pairs = _pairs_file(spark, Path(local_cfg.ingest.input_path), tmp_path_factory.mktemp("pairs"),
                                     bucket_root)
    config = cluster.shared / "store.yaml"
    config.write_text(yaml.safe_dump(_config(cluster, bucket_root) | {"evaluate": {"pairs_path": pairs}}))
    other_done = cluster.shared / "driver2.done"  # the driver host sees /var/tmp: the batch waits for it
    fault_c_input = _fault_c_inputs(spark, Path(local_cfg.ingest.input_path), tmp_path_factory.mktemp("fault_c"),
                                    bucket_root)
    race_root = f"{bucket_root}/race/lake"
    race = ["--config", str(config), f"storage.root={race_root}"]
    job = lambda name: str(REPO / "jobs" / f"{name}.py")  # noqa: E731
    steps = [{"script": job("ingest"), "args": [*race, f"ingest.input_path={race_a}"]},
             {"script": str(REPO / "tests" / "logstore_probe.py"), "args": [f"{bucket_root}/probe/table"]},
             {"wait_for": str(other_done)},  # the other driver's ingest has ended: the race lake is whole
             # fault (a): worker1's host dies during this embed (small partitions: many tasks on both hosts)
             {"script": job("embed"), "args": [*race, "spark.arrow_max_records_per_batch=16"],
              "conf": {"spark.sql.files.maxPartitionBytes": "64k"}},
             *({"script": job(name), "args": ["--config", str(config)]} for name in ("run", "evaluate", "report", "maintain")),
             # fault (c): a file of the input is deleted from the store once ingest has listed it; then the re-run
             *[{"script": job("ingest"), "args": ["--config", str(config), f"storage.root={bucket_root}/fault-c/lake",
                                                  f"ingest.input_path={fault_c_input}"]}] * 2,
             # fault (b): the store stops for STORE_OUTAGE_S during an ingest; then the re-run
             *[{"script": job("ingest"), "args": ["--config", str(config), f"storage.root={bucket_root}/fault-b/lake"]}] * 2]
    env = _submit_env(cluster, jars)
    other = cluster.hosts["driver2"].start(
        _submit_args(cluster, "driver2", job("ingest"), *race, f"ingest.input_path={race_b}", cores=1),
        cluster.root / "logs" / "driver2.out", env=env, cwd=REPO)
    killer, faults = HostKiller(cluster, "worker1"), StoreFaults(cluster, fault_c_input)
    killer.start()
    faults.start()
    threading.Thread(target=lambda: (other.wait(timeout=1800), other_done.write_text("done")), daemon=True).start()
    try:
        proc = cluster.hosts["driver"].run(_submit_args(cluster, "driver", str(REPO / "tests" / "job_batch.py"),
                                                        json.dumps(steps)), env=env)
    finally:
        killer.stop()
        faults.stop()
    other_exit = other.wait(timeout=1800)
    other_out = (cluster.root / "logs" / "driver2.out").read_text(errors="replace")
    # what each step did, kept beside the cluster's logs (pytest keeps the last runs' folders)
    (cluster.root / "summary.json").write_text(json.dumps(
        {"batch": [{k: v for k, v in b.items() if k != "args"} for b in _batch(proc.stdout)],
         "driver2_exit": other_exit, "killed_processes": killer.killed, "faults": faults.done_faults}, indent=1))
    return {"proc": proc, "batch": _batch(proc.stdout), "root": f"{bucket_root}/lake", "local_root": local_cfg.storage.root,
            "cluster": cluster, "race_root": race_root, "race_rows": race_rows,
            "other": {"exit": other_exit, "out": other_out}, "killed": killer.killed, "faults": faults.done_faults,
            "fault_c_rows": FAULT_C_ROWS, "local_pairs": local_pairs, "local_cfg": local_cfg}


FAULT_C_FILES, FAULT_C_ROWS = 3, 30  # the demo input's first 90 rows in three files of 30
STORE_OUTAGE_S = 20.0


def _fault_c_inputs(spark, local_input: Path, folder: Path, bucket_root: str) -> str:
    """A Parquet input folder of three files in the store; fault (c) deletes the last one after the listing."""
    import pyarrow.parquet as pq

    rows = pq.read_table(local_input)
    uri = f"{bucket_root}/fault-c-input"
    for i in range(FAULT_C_FILES):
        local = folder / f"part-{i}.parquet"
        pq.write_table(rows.slice(i * FAULT_C_ROWS, FAULT_C_ROWS), local)
        _upload(spark, local, f"{uri}/{local.name}")
    return uri


class StoreFaults(threading.Thread):
    """Watches the store's request log and injects the store faults at the moments they are meant for.

    (c) once a request lists the fault-c input folder (ingest has listed its files), the folder's last
    file is deleted from the store's disk; (b) once the fault-b ingest writes its first object, the
    store is stopped for STORE_OUTAGE_S and started again.
    """

    def __init__(self, cluster: MultiHostCluster, fault_c_input: str) -> None:
        super().__init__(daemon=True)
        self.cluster, self.done_faults = cluster, {}
        self.c_prefix = fault_c_input.split("/", 3)[3]  # key prefix inside the bucket
        self.stop_event = threading.Event()

    def run(self) -> None:
        driver = f"| {self.cluster.hosts['driver'].address} |"
        listing = "prefix=" + (self.c_prefix + "/").replace("/", "%2F") + "&"  # the driver lists the input folder
        seen = len(self.cluster.store_requests())  # requests before the batch (the uploads) do not count
        while not self.stop_event.wait(0.05):
            lines = self.cluster.store_requests()
            new, seen = lines[seen:], len(lines)
            if "c" not in self.done_faults and any(driver in line and listing in line + "&" and "max-keys=5000" in line
                                                   for line in new):  # the full listing, not getFileStatus's probe
                victim = self.cluster.store_path(f"{self.c_prefix}/part-{FAULT_C_FILES - 1}.parquet")
                victim.unlink()
                self.done_faults["c"] = victim.name
            if "b" not in self.done_faults and any("| PUT |" in line and "/fault-b/lake/" in line for line in new):
                self.cluster.stop_store()
                time.sleep(STORE_OUTAGE_S)
                self.cluster.start_store()
                self.done_faults["b"] = STORE_OUTAGE_S
                return

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)


class HostKiller(threading.Thread):
    """Kills every process of one worker host the first time an embed task runs there (once)."""

    def __init__(self, cluster: MultiHostCluster, host: str) -> None:
        super().__init__(daemon=True)
        self.cluster, self.host, self.killed = cluster, host, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            if self.cluster.embedding_on(self.host):
                self.killed = self.cluster.kill_host(self.host)
                return

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=30)


def test_every_stage_runs_on_hosts_that_share_no_disk(store_run) -> None:
    proc, batch = store_run["proc"], store_run["batch"]
    summary = "\n".join(f"{Path(b.get('script', 'wait')).name}: exit {b['exit']} {b.get('errors')}" for b in batch)
    assert len(batch) == 12 and [b["exit"] for b in batch[:8]] == [0] * 8, summary + "\n" + proc.stderr[-3000:]
    stages = [r["stage"] for b in batch[4:8] for r in b["records"]]
    assert stages == [*STAGES, "evaluate", "report", "report", "maintain"]  # evaluate writes its report too


def _read(spark, root: str, table: str):
    return spark.read.format("delta").load(f"{root.rstrip('/')}/{table}")


def test_store_tables_equal_the_local_run(spark, store_run) -> None:
    """Table by table, the multi-host run on the store equals the local[2] run of the same input."""
    assert_lakes_equal(spark, store_run["root"], store_run["local_root"])


def test_store_evaluation_equals_the_local_one(spark, store_run) -> None:
    """evaluate's metrics from the store run equal those of evaluate on the local[2] lake with the same pairs
    (the demo lake is this module's own: the multi-host tests run in a pytest process of their own)."""
    from ers_spark.stages.evaluate import run_evaluate

    local_cfg = store_run["local_cfg"].with_overrides([f"evaluate.pairs_path={store_run['local_pairs']}",
                                                       "evaluate.write_report=false"])
    run_evaluate(spark, local_cfg)
    key = ["protocol", "method", "metric", "operating_point"]
    remote = _read(spark, store_run["root"], "eval_metrics").toPandas().sort_values(key).reset_index(drop=True)
    local = _read(spark, local_cfg.storage.root, "eval_metrics").toPandas().sort_values(key).reset_index(drop=True)
    assert len(remote) == len(local) > 0
    assert remote[key + ["count"]].equals(local[key + ["count"]])
    np.testing.assert_allclose(remote.value.astype(float), local.value.astype(float), atol=1e-6, equal_nan=True)


def test_the_report_is_in_the_store(spark, store_run) -> None:
    from ers_spark.runtime.driver_files import read_text

    report = [r for b in store_run["batch"] for r in b.get("records", []) if r["stage"] == "report"][-1]
    assert report["path"] == store_run["root"] + "/report.html"
    assert "<html" in read_text(spark, report["path"]).lower()


def test_no_host_saw_the_driver_disk(store_run) -> None:
    """The executors imported ers-spark from the shipped zip (the repo is hidden on their hosts) and
    their model copies came through Spark, inside the workers' own work dirs."""
    embed = next(r for b in store_run["batch"] for r in b.get("records", []) if r["stage"] == "embed")
    runtime = embed["runtime"]
    assert runtime["code"] and all("ers_spark.zip" in origin and origin.startswith("/tmp/work/")
                                   for origin in runtime["code"]), runtime
    assert runtime["model_copies"] and all(c.startswith("/tmp/work/") for c in runtime["model_copies"]), runtime
    assert embed["params"]["model_path"].startswith("/tmp/models/")  # the driver's read-only model mount


def test_two_drivers_ingesting_one_store_table_lose_nothing(spark, store_run) -> None:
    """Two ingests from two driver hosts into one s3a:// table at once: both succeed, the table holds
    the union once, and the counts of both add up (the overlap is `already_present` for one of them)."""
    other = store_run["other"]
    assert other["exit"] == 0, other["out"][-4000:]
    first = store_run["batch"][0]["records"][0]["counts"]
    records = [json.loads(line) for line in other["out"].splitlines() if line.startswith('{"')]
    second = next(r for r in records if r.get("stage") == "ingest")["counts"]
    crops = _read(spark, store_run["race_root"], "crops")
    quarantined = _read(spark, store_run["race_root"], "quarantine").where("stage = 'ingest'").select("image_id")
    assert crops.count() == crops.select("image_id").distinct().count() == first["written"] + second["written"]
    assert crops.count() + quarantined.distinct().count() == store_run["race_rows"]  # every input row, once
    reasons = _read(spark, store_run["race_root"], "quarantine").where("source_path like 'corrupt/%'")
    assert reasons.count() == len(RACE_CORRUPT) and {r.reason for r in reasons.collect()} <= {"undecodable", "empty_file"}
    assert first["read"] + second["read"] == first["written"] + second["written"] + first["already_present"] + \
        second["already_present"] + first["quarantined"] + second["quarantined"]
    assert first["changed_after_probe"] == second["changed_after_probe"] == 0


def test_the_log_store_lets_one_commit_win(store_run) -> None:
    """ers-spark's LogStore against the real store: a commit of version N that another driver already
    made is refused as Delta expects (so Delta retries at N+1); the writer's own retried PUT passes."""
    probe = store_run["batch"][1]["records"][0]
    assert probe == {"stage": "logstore-probe", "first": "written",
                     "other_bytes": "java.nio.file.FileAlreadyExistsException", "same_bytes_again": "written",
                     "kept": '{"commitInfo":{"txnId":"ours"}}'}


def test_a_worker_host_killed_mid_embed(spark, store_run) -> None:
    """Fault (a): every process of worker1's host is SIGKILLed while embed runs there; the job finishes
    on the other host with exactly one embedding per crop and nothing quarantined."""
    assert store_run["killed"], "worker1 never ran an embed task: the kill did not happen during embed"
    (record,) = store_run["batch"][3]["records"]
    crops = _read(spark, store_run["race_root"], "crops").count()
    assert record["counts"]["quarantined"] == 0 and record["counts"]["written"] == crops
    embeddings = _read(spark, store_run["race_root"], "embeddings")
    assert embeddings.count() == embeddings.select("image_id").distinct().count() == crops
    assert "lost" in store_run["proc"].stderr.lower()  # the driver saw the executor go
    print(f"host kill: {store_run['killed']} processes of worker1 killed; {record['counts']}")


def _step_records(store_run, index: int) -> dict:
    return store_run["batch"][index]


def test_an_input_file_deleted_after_listing_stops_in_one_line(spark, store_run) -> None:
    """Fault (c): the ingest that listed three files and found one gone exits 2 with one line naming it
    and writes nothing; the re-run ingests the two files left, each row once."""
    failed, rerun = _step_records(store_run, 8), _step_records(store_run, 9)
    assert store_run["faults"].get("c") == f"part-{FAULT_C_FILES - 1}.parquet"
    assert failed["exit"] == 2 and len(failed["errors"]) == 1, failed
    assert "a file vanished while the job read it" in failed["errors"][0]
    assert f"part-{FAULT_C_FILES - 1}.parquet" in failed["errors"][0]
    assert failed["records"] == []  # no stage record: nothing committed
    assert rerun["exit"] == 0, rerun
    crops = _read(spark, store_run["root"].replace("/lake", "/fault-c/lake"), "crops")
    counts = rerun["records"][0]["counts"]
    assert counts["read"] == (FAULT_C_FILES - 1) * FAULT_C_ROWS
    assert crops.count() == crops.select("image_id").distinct().count() == counts["written"]


def test_the_store_stopping_mid_stage_loses_nothing(spark, store_run) -> None:
    """Fault (b): the store stops for 20 s during an ingest: the job rides through S3A's retries or
    stops in one line (exit 2); the re-run then leaves every input row exactly once."""
    during, rerun = _step_records(store_run, 10), _step_records(store_run, 11)
    assert store_run["faults"].get("b") == STORE_OUTAGE_S
    assert during["exit"] == 0 or (during["exit"] == 2 and len(during["errors"]) == 1
                                   and "the storage did not answer" in during["errors"][0]), during
    assert rerun["exit"] == 0, rerun
    crops = _read(spark, store_run["root"].replace("/lake", "/fault-b/lake"), "crops")
    quarantined = _read(spark, store_run["root"].replace("/lake", "/fault-b/lake"), "quarantine").select("image_id")
    assert crops.count() == crops.select("image_id").distinct().count()
    assert crops.count() + quarantined.distinct().count() == rerun["records"][0]["counts"]["read"]
    print(f"store outage: during exit {during['exit']} {during['errors']}; re-run counts {rerun['records'][0]['counts']}")
