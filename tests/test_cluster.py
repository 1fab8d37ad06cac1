"""ers-spark on a real standalone cluster (master + two workers as processes), through spark-submit.

One cluster for the whole module. What it proves: every ``jobs/*.py`` works under spark-submit
as README documents it (``deploy/ers-submit``); executors import ``ers_spark`` from the shipped zip
and read the model from their own copy; a cluster run equals a ``local[2]`` run; and the faults of
README's reliability table: a worker killed mid-embed, corrupt files, two concurrent ingests,
broken models, CUDA asked for and missing.
"""

from __future__ import annotations

import io
import json
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from chispa import assert_df_equality
from PIL import Image

from ers_spark.lake.contracts import CLEANED, CROPS, EMBEDDINGS, QUARANTINE, SCORES, UI_MEMBERS
from standalone_cluster import REPO, StandaloneCluster, SubmitResult

pytestmark = [pytest.mark.spark, pytest.mark.cluster]

DEMO_OVERRIDES = ("ingest.input_format=parquet", "ingest.path_column=path", "ingest.identity_column=identity",
                  "locate_ui.kmeans_cells=4", "spark.shuffle_partitions=4", "spark.hive_metastore=false")
STAGES = ["ingest", "embed", "locate-ui", "score", "clean"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("standalone")
    jars = root / "jars"
    fetched = subprocess.run([str(REPO / "deploy" / "fetch_jars.sh"), str(jars)], capture_output=True, text=True)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
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
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-6000:])
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


JOB_SCRIPTS = ["ingest", "embed", "locate_ui", "score", "clean", "demo"]


@pytest.fixture(scope="module")
def every_job_rerun(spark, cluster, demo_lake, cluster_run, tmp_path_factory) -> tuple[dict, dict, list[dict]]:
    """Each stage script, then jobs/demo.py, on the cluster's lake (spark-submit, one JVM: tests/job_batch.py)."""
    root, _ = cluster_run
    home = tmp_path_factory.mktemp("home")  # the demo writes its input under $HOME/.ers-spark/demo
    before = {t: _read(spark, root, t).count() for t in ("crops", "embeddings", "scores", "cleaned")}
    args = _overrides(root, Path(demo_lake[0].ingest.input_path))
    result, runs = cluster.submit_batch([(job, args) for job in JOB_SCRIPTS], env={"HOME": str(home)})
    _ok(result)
    after = {t: _read(spark, root, t).count() for t in before}
    return before, after, [r for r in result.json_lines()]


@pytest.mark.parametrize("job", JOB_SCRIPTS)
def test_each_job_script_runs_under_spark_submit(every_job_rerun, job) -> None:
    """Every jobs/*.py under spark-submit on the cluster's lake: it runs and changes nothing (re-runs are no-ops)."""
    before, after, records = every_job_rerun
    assert after == before
    stage_records = records[:5] if job != "demo" else records[5:]
    expected = STAGES if job == "demo" else [STAGES[JOB_SCRIPTS.index(job)]]
    got = [r for r in stage_records if r["stage"] in expected]
    assert [r["stage"] for r in got] == expected
    for record in got:
        written = {"ingest": "written", "embed": "written", "score": "inserted", "clean": "cleaned_changed"}
        if record["stage"] in written:
            assert record["counts"][written[record["stage"]]] == 0, record


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


def test_worker_killed_during_embed_and_corrupt_files(spark, cluster, tmp_path) -> None:
    """Faults (a) and (d): 1,000 images plus 5% corrupt files; ingest quarantines exactly the corrupt
    ones with their reason; one worker is SIGKILLed while embed runs, and the job finishes on the
    other with exactly one embedding per crop."""
    root = tmp_path / "lake"
    n = 1000
    folder = _image_folder(tmp_path / "faces", range(n))
    corrupt = _corrupt_files(folder, n * 5 // 95)
    (ingest,) = _ok(cluster.submit("ingest", f"storage.root={root}", f"ingest.input_path={folder}",
                                   "spark.hive_metastore=false", "spark.shuffle_partitions=4")).json_lines()
    assert ingest["counts"] == {"read": n + len(corrupt), "written": n, "already_present": 0,
                                "quarantined": len(corrupt), "identity_conflicts": 0}
    quarantined = _read(spark, root, QUARANTINE.name).toPandas()
    assert sorted(quarantined.source_path.str.replace("file:", "")) == sorted(corrupt)
    assert set(quarantined.reason) == {"undecodable", "empty_file"} and quarantined.detail.notna().all()
    killed: dict[str, int] = {}

    def kill_when_worker0_embeds() -> None:
        """Kill worker 0 once one of its executor's Python workers has the model runtime loaded."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if cluster.python_workers_with_model_runtime(0):
                killed["pid"] = cluster.kill_worker(0)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_worker0_embeds, daemon=True)
    watcher.start()
    try:
        result = cluster.submit("embed", f"storage.root={root}", "spark.hive_metastore=false", "spark.shuffle_partitions=4",
                                "spark.arrow_max_records_per_batch=64", conf={"spark.sql.files.maxPartitionBytes": "256k"})
        watcher.join(timeout=5)
        _ok(result)
        assert killed, "worker 0 never received the model: the kill did not happen during embed"
        (record,) = result.json_lines()
        assert record["counts"]["written"] == n and record["counts"]["quarantined"] == 0
        embeddings = _read(spark, root, EMBEDDINGS.name)
        assert embeddings.count() == embeddings.select("image_id").distinct().count() == n
        assert "lost" in result.stderr.lower()  # the driver saw the executor go
        assert _quarantined(spark, root, "embed") == 0
        print(f"worker kill: {n} crops embedded once each after killing pid {killed['pid']}; "
              f"tasks by device {record['runtime']['tasks_by_device']}")
    finally:
        cluster.ensure_workers()


def test_concurrent_ingests_end_as_the_union(spark, cluster, tmp_path) -> None:
    """Fault (b): two ingests of overlapping folders at the same time: crops = union, no duplicates."""
    root = tmp_path / "lake"
    # one person's photos in two overlapping folders: 50 images in both (same bytes and identity, other paths)
    first = _image_folder(tmp_path / "a" / "person", range(0, 150)).parent
    second = _image_folder(tmp_path / "b" / "person", range(100, 250)).parent
    args = [f"storage.root={root}", "spark.hive_metastore=false", "spark.shuffle_partitions=4"]
    conf = {"spark.cores.max": "1"}
    procs = [
        subprocess.Popen(cluster.submit_args("ingest", *args, f"ingest.input_path={folder}", conf=conf),
                         cwd=cluster.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=cluster._env())
        for folder in (first, second)
    ]
    outputs = [p.communicate(timeout=400) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-4000:]
    crops = _read(spark, root, CROPS.name)
    assert crops.count() == crops.select("image_id").distinct().count() == 250
    records = [json.loads(line) for out, _ in outputs for line in out.splitlines() if line.startswith('{"')]
    assert sum(r["counts"]["written"] for r in records) == 250
    # a conflict, when the two commits met, was retried rather than fatal
    retried = sum(err.count("concurrent write") for _, err in outputs)
    print(f"concurrent ingests: write-conflict retries {retried}")


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


BROKEN = {"corrupt_file": "cannot load ONNX model", "wrong_input_shape": "has shape", "wrong_output_dim": "-D embeddings"}
# every task gets one of the workers' (fake) GPUs; a failing task is tried twice, not four times
GPU_CONF = {"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1",
            "spark.task.maxFailures": "2"}


@pytest.fixture(scope="module")
def model_faults(spark, cluster, tmp_path_factory) -> tuple[Path, dict[str, dict], list[dict]]:
    """One spark-submit on the cluster, GPUs requested, running jobs/embed.py five times (tests/job_batch.py):
    three broken models, then embed.device=cuda (no CUDA provider here), then embed.device=auto."""
    from ers_spark.config import load_config
    from ers_spark.stages.ingest import run_ingest

    root = tmp_path_factory.mktemp("model_faults")
    lake = root / "lake"
    folder = _image_folder(root / "faces", range(40))
    run_ingest(spark, load_config(overrides=[f"storage.root={lake}", "storage.database=ers_model_faults",
                                             f"ingest.input_path={folder}", "spark.shuffle_partitions=2"]))
    base = [f"storage.root={lake}", "spark.hive_metastore=false", "spark.shuffle_partitions=2"]
    specs = _broken_models(root)
    plan = [("embed", [*base, f"embed.model={specs[case]}"]) for case in BROKEN]
    plan += [("embed", [*base, "embed.device=cuda"]), ("embed", [*base, "embed.device=auto"])]
    result, runs = cluster.submit_batch(plan, conf=GPU_CONF)
    assert len(runs) == len(plan), (result.stdout[-3000:], result.stderr[-3000:])
    by_case = dict(zip([*BROKEN, "cuda", "auto"], runs))
    return lake, by_case, result.json_lines()


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_model_fails_the_job(spark, model_faults, case) -> None:
    """Fault (c): a broken model: exit 2 with one line naming the problem, nothing quarantined."""
    lake, runs, _ = model_faults
    assert runs[case]["exit"] == 2, runs[case]
    (line,) = runs[case]["errors"]
    assert BROKEN[case] in line
    assert _quarantined(spark, lake, "embed") == 0


def test_cuda_required_but_missing_fails_on_the_executor(spark, model_faults) -> None:
    """Fault (c), executor side: Spark gives each task a (fake) GPU, ONNX Runtime here has no CUDA
    provider, embed.device=cuda: the task fails and the job exits 2 in one line; nothing quarantined."""
    lake, runs, _ = model_faults
    assert runs["cuda"]["exit"] == 2, runs["cuda"]
    (line,) = runs["cuda"]["errors"]
    assert "CUDAExecutionProvider" in line and "raised on an executor" in line
    assert _quarantined(spark, lake, "embed") == 0


def test_auto_device_reports_the_fallback_per_task(model_faults) -> None:
    """embed.device=auto with a (fake) GPU per task: runs on CPU and the run log says so, per task."""
    _, runs, records = model_faults
    assert runs["auto"]["exit"] == 0, runs["auto"]
    (record,) = records  # the only stage that got to write its JSON line
    devices = record["runtime"]["tasks_by_device"]
    assert devices and all(d.startswith("cpu CPUExecutionProvider (gpu ") for d in devices), devices
    assert record["counts"]["written"] == 40
