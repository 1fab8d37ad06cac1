"""ers-spark on a real standalone cluster (master + two workers as processes), through spark-submit.

One cluster for the whole module. What it proves: every ``jobs/*.py`` works under spark-submit
as README documents it (``deploy/ers-submit``); executors import ``ers_spark`` from the shipped zip
and read the model from their own copy; a cluster run equals a ``local[2]`` run; and the faults of
README's reliability table: a worker killed mid-embed, corrupt files, two concurrent ingests,
broken models, CUDA asked for and missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from chispa import assert_df_equality
from PIL import Image

from ers_spark.lake.contracts import CLEANED, CROPS, EMBEDDINGS, QUARANTINE, SCORES, UI_MEMBERS
from standalone_cluster import REPO, SUBMIT_HANG_GUARD_S, StandaloneCluster, SubmitResult, failure_text

pytestmark = [pytest.mark.spark, pytest.mark.cluster]

DEMO_OVERRIDES = ("ingest.input_format=parquet", "ingest.path_column=path", "ingest.identity_column=identity",
                  "locate_ui.kmeans_cells=4", "spark.shuffle_partitions=4", "spark.hive_metastore=false")
STAGES = ["ingest", "embed", "locate-ui", "score", "clean"]


def delta_jars_folder() -> Path:
    """Delta's jars as ``deploy/fetch_jars.sh`` fetches them, kept between runs under ~/.cache/ers-spark.

    The first run on a machine runs the script (about a minute of downloads); later runs reuse its output.
    """
    from ers_spark.config import load_config

    packages = load_config().spark.packages
    key = hashlib.sha256(json.dumps(sorted(packages)).encode()).hexdigest()[:16]
    folder = Path.home() / ".cache" / "ers-spark" / f"test-jars-{key}"
    if (folder / "COMPLETE").exists():
        return folder
    staging = Path(tempfile.mkdtemp(prefix="ers-jars-", dir=folder.parent if folder.parent.exists() else None))
    fetched = subprocess.run([str(REPO / "deploy" / "fetch_jars.sh"), str(staging)], capture_output=True, text=True)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    assert any(jar.name.startswith("io.delta_delta-spark") for jar in staging.glob("*.jar")), fetched.stdout
    (staging / "COMPLETE").write_text(json.dumps(packages))
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.move(str(staging), folder)
    return folder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("standalone")
    jars = delta_jars_folder()
    packaged = subprocess.run([str(REPO / "deploy" / "package.sh"), str(root / "dist")], capture_output=True, text=True)
    assert packaged.returncode == 0, packaged.stderr
    extra_env = {"ERS_SPARK_JARS_DIR": str(jars), "ERS_SPARK_ZIP": str(root / "dist" / "ers_spark.zip")}
    started = StandaloneCluster(root, extra_env=extra_env).start()
    try:
        yield started
    finally:
        started.stop()


def _overrides(root: Path, input_path: Path | None = None) -> list[str]:
    out = [f"storage.root={root}", f"spark.checkpoint_dir={root}/_ckpt", *DEMO_OVERRIDES]
    return out + ([f"ingest.input_path={input_path}"] if input_path else [])


def _ok(result: SubmitResult) -> SubmitResult:
    assert result.returncode == 0, result.failure()
    return result


def _read(spark, root: Path, table: str):
    return spark.read.format("delta").load(str(root / table))


def _quarantined(spark, root: Path, stage: str) -> int:
    from delta.tables import DeltaTable

    if not DeltaTable.isDeltaTable(spark, str(root / QUARANTINE.name)):
        return 0
    return _read(spark, root, QUARANTINE.name).where(f"stage = '{stage}'").count()


@pytest.fixture(scope="module")
def cluster_run(cluster, demo_lake, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The whole pipeline (jobs/run.py) on the standalone cluster, on the demo's input."""
    root = tmp_path_factory.mktemp("cluster_lake")
    result = _ok(cluster.submit("run", *_overrides(root, Path(demo_lake[0].ingest.input_path))))
    return root, result.json_lines()


def test_cluster_run_equals_local_run(spark, demo_lake, cluster_run) -> None:
    """jobs/run.py on the cluster leaves the same tables as the pipeline in local[2] (the test session's)."""
    local_root = Path(demo_lake[0].storage.root)
    cluster_root, records = cluster_run
    assert [r["stage"] for r in records] == STAGES
    for table, columns in ((CROPS, ["image_id", "source_path", "identity", "width", "height", "format"]),
                           (SCORES, ["image_id", "recognizable"]), (CLEANED, ["image_id", "identity"]),
                           (QUARANTINE, ["image_id", "stage", "reason"]), (UI_MEMBERS, ["image_id"])):
        local = _read(spark, local_root, table.name).select(*columns).orderBy(*columns)
        remote = _read(spark, cluster_root, table.name).select(*columns).orderBy(*columns)
        assert_df_equality(remote, local, ignore_nullable=True)
    for table, column in ((EMBEDDINGS, "embedding"), (SCORES, "ers")):
        local = _read(spark, local_root, table.name).select("image_id", column).toPandas().sort_values("image_id")
        remote = _read(spark, cluster_root, table.name).select("image_id", column).toPandas().sort_values("image_id")
        assert list(local.image_id) == list(remote.image_id)
        np.testing.assert_allclose(np.stack(remote[column]), np.stack(local[column]), atol=1e-5)


def test_executors_use_shipped_code_and_their_own_model_copy(cluster, cluster_run) -> None:
    _, records = cluster_run
    runtime = next(r for r in records if r["stage"] == "embed")["runtime"]
    work_dirs = [str(cluster.work_dir(i)) for i in range(2)]
    assert runtime["code"], runtime
    for origin in runtime["code"]:  # imported from the zip the job shipped, inside a worker's work dir
        assert any(origin.startswith(w) for w in work_dirs) and "ers_spark.zip" in origin, origin
    for copy in runtime["model_copies"]:  # each executor's own copy, fetched by Spark, not the driver's path
        assert any(copy.startswith(w) for w in work_dirs), copy
    assert sum(runtime["tasks_by_device"].values()) >= 1


def _corrupt_files(folder: Path, count: int) -> list[str]:
    garbage = [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"<html>not an image</html>", b"GIF89a"]
    paths = []
    for k in range(count):
        path = folder / f"corrupt{k:04d}.{('png', 'png', 'jpg', 'gif')[k % 4]}"
        path.write_bytes(garbage[k % 4])
        paths.append(str(path))
    return paths


def _noise_png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(folder: Path, ids: range) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        (folder / f"img{i:05d}.png").write_bytes(_noise_png(i))
    return folder


def _spec(path: Path, model: Path, **changes) -> Path:
    import yaml

    doc = {"name": "broken", "version": "1", "onnx_path": str(model), "input_height": 112, "input_width": 112,
           "channel_order": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3, "layout": "NCHW", "embedding_dim": 64}
    doc.update(changes)
    path.write_text(yaml.safe_dump(doc))
    return path


def _broken_models(folder: Path) -> dict[str, Path]:
    from onnx_builders import tiny_embedding_model

    corrupt = folder / "corrupt.onnx"
    corrupt.write_bytes(b"this is not an onnx file" * 100)
    good = tiny_embedding_model(folder / "tiny.onnx", size=112, dim=64)
    return {
        "corrupt_file": _spec(folder / "corrupt.yaml", corrupt),
        "wrong_input_shape": _spec(folder / "shape.yaml", good, input_height=150, input_width=150),
        "wrong_output_dim": _spec(folder / "dim.yaml", good, embedding_dim=128),
    }


JOB_SCRIPTS = ["ingest", "embed", "locate_ui", "score", "clean", "demo", "maintain"]
BROKEN = {"corrupt_file": "cannot load ONNX model", "wrong_input_shape": "has shape", "wrong_output_dim": "-D embeddings"}
FAULT_CASES = [*BROKEN, "cuda", "auto"]
# every task gets one of the workers' (fake) GPUs; a failing task is tried twice, not four times
GPU_CONF = {"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1",
            "spark.task.maxFailures": "2"}


def _model_fault_runs(spark, root: Path) -> list[tuple[str, list[str]]]:
    """jobs/embed.py on a 40-crop lake: three broken models, embed.device=cuda (no CUDA provider here), auto."""
    from ers_spark.config import load_config
    from ers_spark.stages.ingest import run_ingest

    lake = root / "lake"
    folder = _image_folder(root / "faces", range(40))
    run_ingest(spark, load_config(overrides=[f"storage.root={lake}", "storage.database=ers_model_faults",
                                             f"ingest.input_path={folder}", "spark.shuffle_partitions=2"]))
    base = [f"storage.root={lake}", "spark.hive_metastore=false", "spark.shuffle_partitions=2"]
    specs = _broken_models(root)
    plan = [("embed", [*base, f"embed.model={specs[case]}"]) for case in BROKEN]
    return plan + [("embed", [*base, "embed.device=cuda"]), ("embed", [*base, "embed.device=auto"])]


@pytest.fixture(scope="module")
def job_batch(spark, cluster, demo_lake, cluster_run, tmp_path_factory) -> dict:
    """One spark-submit on the cluster with GPUs requested (tests/job_batch.py: one JVM) running, in order,
    every jobs/*.py again on the cluster run's lake (re-runs, which must change nothing), then the model
    faults of :func:`_model_fault_runs` on a lake of their own."""
    root, _ = cluster_run
    faults_root = tmp_path_factory.mktemp("model_faults")
    home = tmp_path_factory.mktemp("home")  # the demo writes its input under $HOME/.ers-spark/demo
    before = {t: _read(spark, root, t).count() for t in ("crops", "embeddings", "scores", "cleaned")}
    args = _overrides(root, Path(demo_lake[0].ingest.input_path))
    plan = [(job, args) for job in JOB_SCRIPTS] + _model_fault_runs(spark, faults_root)
    result, runs = cluster.submit_batch(plan, conf=GPU_CONF, env={"HOME": str(home)})
    assert len(runs) == len(plan), (result.stdout[-3000:], result.stderr[-3000:])
    after = {t: _read(spark, root, t).count() for t in before}
    return {"before": before, "after": after, "reruns": dict(zip(JOB_SCRIPTS, runs)),
            "faults": dict(zip(FAULT_CASES, runs[len(JOB_SCRIPTS):])), "faults_lake": faults_root / "lake"}


@pytest.mark.parametrize("job", JOB_SCRIPTS)
def test_each_job_script_runs_under_spark_submit(job_batch, job) -> None:
    """Every jobs/*.py under spark-submit on the cluster's lake: it runs and changes nothing (re-runs are no-ops)."""
    run = job_batch["reruns"][job]
    assert run["exit"] == 0, run
    assert job_batch["after"] == job_batch["before"]
    expected = {"demo": [*STAGES, "report"], "maintain": ["maintain"]}.get(job) or [STAGES[JOB_SCRIPTS.index(job)]]
    assert [r["stage"] for r in run["records"]] == expected
    written = {"ingest": "written", "embed": "written", "score": "inserted", "clean": "cleaned_changed"}
    for record in run["records"]:
        if record["stage"] in written:
            assert record["counts"][written[record["stage"]]] == 0, record


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_model_fails_the_job(spark, job_batch, case) -> None:
    """Fault (c): a broken model: exit 2 with one line naming the problem, nothing quarantined."""
    run = job_batch["faults"][case]
    assert run["exit"] == 2, run
    (line,) = run["errors"]
    assert BROKEN[case] in line
    assert _quarantined(spark, job_batch["faults_lake"], "embed") == 0


def test_cuda_required_but_missing_fails_on_the_executor(spark, job_batch) -> None:
    """Fault (c), executor side: Spark gives each task a (fake) GPU, ONNX Runtime here has no CUDA
    provider, embed.device=cuda: the task fails and the job exits 2 in one line; nothing quarantined."""
    run = job_batch["faults"]["cuda"]
    assert run["exit"] == 2, run
    (line,) = run["errors"]
    assert "CUDAExecutionProvider" in line and "raised on an executor" in line
    assert _quarantined(spark, job_batch["faults_lake"], "embed") == 0


def test_auto_device_reports_the_fallback_per_task(job_batch) -> None:
    """embed.device=auto with a (fake) GPU per task: runs on CPU and the run log says so, per task."""
    run = job_batch["faults"]["auto"]
    assert run["exit"] == 0, run
    (record,) = run["records"]
    devices = record["runtime"]["tasks_by_device"]
    assert devices and all(d.startswith("cpu CPUExecutionProvider (gpu ") for d in devices), devices
    assert record["counts"]["written"] == 40


UNION = 400  # images in the two ingest folders together; 100 of them in both
CORRUPT = UNION * 5 // 95  # 5% of all files


@pytest.fixture(scope="module")
def concurrent_ingests(cluster, tmp_path_factory) -> dict:
    """Faults (b) and (d) together: two ingests started at the same time on overlapping folders of one
    person's photos (100 images in both: same bytes and identity, other paths), 5% of the files corrupt."""
    tmp = tmp_path_factory.mktemp("faults")
    first = _image_folder(tmp / "a" / "person", range(0, 250))
    second = _image_folder(tmp / "b" / "person", range(150, UNION))
    corrupt = _corrupt_files(first, CORRUPT // 2) + _corrupt_files(second, CORRUPT - CORRUPT // 2)
    root = tmp / "lake"
    args = [f"storage.root={root}", "spark.hive_metastore=false", "spark.shuffle_partitions=4"]
    procs = [
        subprocess.Popen(cluster.submit_args("ingest", *args, f"ingest.input_path={folder.parent}",
                                             conf={"spark.cores.max": "1"}),
                         cwd=cluster.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster._env())
        for folder in (first, second)
    ]
    outputs = [p.communicate(timeout=SUBMIT_HANG_GUARD_S) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, failure_text(out, err)
    records = [json.loads(line) for out, _ in outputs for line in out.splitlines() if line.startswith('{"')]
    return {"root": root, "corrupt": corrupt, "records": records, "stderr": [err for _, err in outputs]}


def test_concurrent_ingests_end_as_the_union(spark, concurrent_ingests) -> None:
    """Fault (b): crops = the union, no duplicates; every file of each job is accounted for."""
    root, records = concurrent_ingests["root"], concurrent_ingests["records"]
    crops = _read(spark, root, CROPS.name)
    assert crops.count() == crops.select("image_id").distinct().count() == UNION
    assert sum(r["counts"]["written"] for r in records) == UNION
    # every file of both folders was read; the shared ones were written once and found present once
    assert sum(r["counts"]["read"] for r in records) == 500 + CORRUPT
    assert sum(r["counts"]["already_present"] for r in records) == 100
    assert all(r["counts"]["identity_conflicts"] == 0 for r in records)
    # a conflict, when the two commits met, was retried rather than fatal
    retried = sum(err.count("concurrent write") for err in concurrent_ingests["stderr"])
    print(f"concurrent ingests: {UNION} crops from 250 + 250 files; write-conflict retries {retried}")


def test_corrupt_files_are_quarantined_with_their_reason(spark, concurrent_ingests) -> None:
    """Fault (d): exactly the corrupt files are in quarantine, each with its reason and detail."""
    root, corrupt = concurrent_ingests["root"], concurrent_ingests["corrupt"]
    assert sum(r["counts"]["quarantined"] for r in concurrent_ingests["records"]) == len(corrupt) == CORRUPT
    quarantined = _read(spark, root, QUARANTINE.name).toPandas()
    assert sorted(quarantined.source_path.str.replace("file:", "")) == sorted(corrupt)
    assert set(quarantined.reason) == {"undecodable", "empty_file"} and quarantined.detail.notna().all()


def test_worker_killed_during_embed(spark, cluster, concurrent_ingests) -> None:
    """Fault (a): one worker is SIGKILLed while embed runs on the ingested lake; the job finishes on
    the other with exactly one embedding per crop and nothing quarantined."""
    root = concurrent_ingests["root"]
    killed: dict[str, int] = {}
    embed_ended = threading.Event()

    def kill_when_worker0_embeds() -> None:
        """Kill worker 0 once one of its executor's Python workers has the model runtime loaded."""
        while not embed_ended.is_set() and not killed:
            if cluster.python_workers_with_model_runtime(0):
                killed["pid"] = cluster.kill_worker(0)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_worker0_embeds, daemon=True)
    watcher.start()
    try:
        result = cluster.submit("embed", f"storage.root={root}", "spark.hive_metastore=false", "spark.shuffle_partitions=4",
                                "spark.arrow_max_records_per_batch=32", conf={"spark.sql.files.maxPartitionBytes": "128k"})
        embed_ended.set()
        watcher.join(timeout=5)
        _ok(result)
        assert killed, "worker 0 never received the model: the kill did not happen during embed"
        (record,) = result.json_lines()
        assert record["counts"]["written"] == UNION and record["counts"]["quarantined"] == 0
        embeddings = _read(spark, root, EMBEDDINGS.name)
        assert embeddings.count() == embeddings.select("image_id").distinct().count() == UNION
        assert "lost" in result.stderr.lower()  # the driver saw the executor go
        assert _quarantined(spark, root, "embed") == 0
        print(f"worker kill: {UNION} crops embedded once each after killing pid {killed['pid']}; "
              f"tasks by device {record['runtime']['tasks_by_device']}")
    finally:
        embed_ended.set()
        cluster.ensure_workers()
