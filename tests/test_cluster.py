"""ers-spark on a real standalone cluster (master + two workers as processes), through spark-submit.

One cluster for the whole module. What it proves: every ``jobs/*.py`` works under spark-submit
as README documents it (``deploy/ers-submit``); executors import ``ers_spark`` from the shipped zip
and read the model from their own copy; a cluster run equals a ``local[2]`` run; re-runs change
nothing; and the model faults of README's reliability table: broken models, CUDA asked for and missing
(each task given one of the workers' fake GPUs).

Each spark-submit costs a driver JVM and an executor JVM per worker, so the module runs one
application (``tests/job_batch.py``) that holds every job run. The faults that need hosts of their
own (a worker host killed mid-embed, two drivers writing one table, the object store stopping, an
input file vanishing) run on hosts that share no disk, in tests/test_multi_host.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ers_spark.lake.contracts import QUARANTINE
from lake_compare import assert_lakes_equal
from standalone_cluster import REPO, StandaloneCluster, SubmitResult, job_step

pytestmark = [pytest.mark.spark, pytest.mark.cluster]

# every process of this cluster runs on this one host and sees its one disk: local paths are shared
ONE_DISK = "spark.shared_filesystem=true"
DEMO_OVERRIDES = ("ingest.input_format=parquet", "ingest.path_column=path", "ingest.identity_column=identity",
                  "locate_ui.kmeans_cells=4", "spark.shuffle_partitions=4", "spark.hive_metastore=false", ONE_DISK)
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


STAGE_SCRIPTS = ["ingest", "embed", "locate_ui", "score", "clean"]  # the cluster run, one script per stage
RERUN_SCRIPTS = ["run", "demo", "maintain"]  # then again on the same lake: every stage re-run, nothing changes
JOB_SCRIPTS = [*STAGE_SCRIPTS, *RERUN_SCRIPTS]
COUNTED = ("crops", "embeddings", "scores", "cleaned")
BROKEN = {"corrupt_file": "cannot load ONNX model", "wrong_input_shape": "has shape", "wrong_output_dim": "-D embeddings"}
FAULT_CASES = [*BROKEN, "cuda", "auto"]
# every task gets one of the workers' (fake) GPUs; a failing task is tried twice, not four times; one core per
# executor and two executors, one on each worker (spread out), so both workers run the batch's tasks
BATCH_CONF = {"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1",
              "spark.task.maxFailures": "2", "spark.executor.cores": "1", "spark.cores.max": "2"}


@dataclass
class FaultInputs:
    """Inputs of the model fault runs: 40 faces and broken model specs."""

    faces: Path
    faults_lake: Path
    specs: dict[str, Path]


def _fault_inputs(tmp: Path) -> FaultInputs:
    return FaultInputs(_image_folder(tmp / "faces", range(40)), tmp / "faults_lake", _broken_models(tmp))


def _model_fault_steps(inputs: FaultInputs) -> list[dict]:
    """jobs/embed.py on a 40-crop lake: three broken models, embed.device=cuda (no CUDA provider here), auto."""
    base = [f"storage.root={inputs.faults_lake}", "spark.hive_metastore=false", ONE_DISK, "spark.shuffle_partitions=2"]
    ingest = job_step("ingest", *base, f"ingest.input_path={inputs.faces}")
    embeds = [[*base, f"embed.model={inputs.specs[case]}"] for case in BROKEN]
    embeds += [[*base, "embed.device=cuda"], [*base, "embed.device=auto"]]
    return [ingest, *(job_step("embed", *args) for args in embeds)]


def _cluster_steps(root: Path, demo_input: Path) -> list[dict]:
    """The pipeline on the demo input one stage script at a time, then run, demo and maintain again on its lake."""
    probe = {"probe": str(root), "tables": list(COUNTED)}
    args = _overrides(root, demo_input)
    return [*(job_step(job, *args) for job in STAGE_SCRIPTS), probe, *(job_step(job, *args) for job in RERUN_SCRIPTS),
            probe]


@pytest.fixture(scope="module")
def cluster_jobs(spark, cluster, demo_lake, tmp_path_factory) -> dict:
    """One spark-submit (``tests/job_batch.py``: one driver, two executors) runs, in order: every stage
    script on the demo input (the cluster run), run/demo/maintain again on that lake, and the model faults."""
    tmp = tmp_path_factory.mktemp("cluster_jobs")
    inputs, root = _fault_inputs(tmp / "faults"), tmp / "cluster_lake"
    steps = [*_cluster_steps(root, Path(demo_lake[0].ingest.input_path)), *_model_fault_steps(inputs)]
    batch = cluster.start_batch(steps, conf=BATCH_CONF, env={"HOME": str(tmp_path_factory.mktemp("home"))})
    result, runs = batch.wait()
    assert len(runs) == len(steps), result.failure()
    return _named_runs(runs, inputs, root, result)


def _named_runs(runs: list[dict], inputs: FaultInputs, root: Path, batch: SubmitResult) -> dict:
    stage_runs = runs[:len(STAGE_SCRIPTS)]
    before, *reruns, after = runs[len(STAGE_SCRIPTS):len(STAGE_SCRIPTS) + len(RERUN_SCRIPTS) + 2]
    faults = runs[-len(FAULT_CASES):]
    return {"cluster_root": root, "records": [r for run in stage_runs for r in run["records"]],
            "jobs": dict(zip(JOB_SCRIPTS, [*stage_runs, *reruns])), "before": before["counts"], "after": after["counts"],
            "faults": dict(zip(FAULT_CASES, faults)), "faults_lake": inputs.faults_lake, "batch": batch}


def test_cluster_run_equals_local_run(spark, demo_lake, cluster_jobs) -> None:
    """The stage scripts on the cluster leave the same tables as the pipeline in local[2] (the test session's)."""
    assert [r["stage"] for r in cluster_jobs["records"]] == STAGES
    assert_lakes_equal(spark, cluster_jobs["cluster_root"], demo_lake[0].storage.root)


def test_executors_use_shipped_code_and_their_own_model_copy(cluster, cluster_jobs) -> None:
    runtime = next(r for r in cluster_jobs["records"] if r["stage"] == "embed")["runtime"]
    work_dirs = [str(cluster.work_dir(i)) for i in range(2)]
    assert runtime["code"], runtime
    for origin in runtime["code"]:  # imported from the zip the job shipped, inside a worker's work dir
        assert any(origin.startswith(w) for w in work_dirs) and "ers_spark.zip" in origin, origin
    for copy in runtime["model_copies"]:  # each executor's own copy, fetched by Spark, not the driver's path
        assert any(copy.startswith(w) for w in work_dirs), copy
    assert sum(runtime["tasks_by_device"].values()) >= 1


@pytest.mark.parametrize("job", JOB_SCRIPTS)
def test_each_job_script_runs_under_spark_submit(cluster_jobs, job) -> None:
    """Every jobs/*.py under spark-submit on the cluster: the stage scripts build the lake, then run, demo
    and maintain run every stage again on it, which changes nothing (re-runs are no-ops)."""
    run = cluster_jobs["jobs"][job]
    assert run["exit"] == 0, run
    expected = {"run": STAGES, "demo": [*STAGES, "report"], "maintain": ["maintain"]}.get(job)
    assert [r["stage"] for r in run["records"]] == (expected or [STAGES[STAGE_SCRIPTS.index(job)]])
    if job in RERUN_SCRIPTS:
        assert cluster_jobs["after"] == cluster_jobs["before"]
        written = {"ingest": "written", "embed": "written", "score": "inserted", "clean": "cleaned_changed"}
        for record in run["records"]:
            if record["stage"] in written:
                assert record["counts"][written[record["stage"]]] == 0, record


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_model_fails_the_job(spark, cluster_jobs, case) -> None:
    """Fault (c): a broken model: exit 2 with one line naming the problem, nothing quarantined."""
    run = cluster_jobs["faults"][case]
    assert run["exit"] == 2, run
    (line,) = run["errors"]
    assert BROKEN[case] in line
    assert _quarantined(spark, cluster_jobs["faults_lake"], "embed") == 0


def test_cuda_required_but_missing_fails_on_the_executor(spark, cluster_jobs) -> None:
    """Fault (c), executor side: Spark gives each task a (fake) GPU, ONNX Runtime here has no CUDA
    provider, embed.device=cuda: the task fails and the job exits 2 in one line; nothing quarantined."""
    run = cluster_jobs["faults"]["cuda"]
    assert run["exit"] == 2, run
    (line,) = run["errors"]
    assert "CUDAExecutionProvider" in line and "raised on an executor" in line
    assert _quarantined(spark, cluster_jobs["faults_lake"], "embed") == 0


def test_auto_device_reports_the_fallback_per_task(cluster_jobs) -> None:
    """embed.device=auto with a (fake) GPU per task: runs on CPU and the run log says so, per task."""
    run = cluster_jobs["faults"]["auto"]
    assert run["exit"] == 0, run
    (record,) = run["records"]
    devices = record["runtime"]["tasks_by_device"]
    assert devices and all(d.startswith("cpu CPUExecutionProvider (gpu ") for d in devices), devices
    assert record["counts"]["written"] == 40
