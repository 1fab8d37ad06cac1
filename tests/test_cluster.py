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
def local_demo(cluster, tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """jobs/demo.py through spark-submit, master local[2] (HOME in a temp folder: its input and lake stay there)."""
    home = tmp_path_factory.mktemp("home")
    root = home / "lake"
    result = _ok(cluster.submit("demo", f"storage.root={root}", *DEMO_OVERRIDES[3:], master="local[2]",
                                env={"HOME": str(home)}))
    return root, home / ".ers-spark" / "demo" / "input" / "demo_images.parquet", result.json_lines()


@pytest.fixture(scope="module")
def cluster_run(cluster, local_demo, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The whole pipeline (jobs/run.py) on the standalone cluster, on the demo's input."""
    root = tmp_path_factory.mktemp("cluster_lake")
    result = _ok(cluster.submit("run", *_overrides(root, local_demo[1])))
    return root, result.json_lines()


def test_demo_job_runs_under_spark_submit(local_demo) -> None:
    _, _, records = local_demo
    assert [r["stage"] for r in records] == STAGES
    clean = records[-1]["counts"]
    assert clean["scored"] == clean["cleaned"] + clean["quarantined"] == records[0]["counts"]["written"]


def test_cluster_run_equals_local_run(spark, local_demo, cluster_run) -> None:
    local_root = local_demo[0]
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


@pytest.mark.parametrize("job", ["ingest", "embed", "locate_ui", "score", "clean"])
def test_each_stage_job_reruns_under_spark_submit(spark, cluster, local_demo, cluster_run, job) -> None:
    """Each stage's entry script under spark-submit, on the cluster's lake: it runs and changes nothing."""
    root, _ = cluster_run
    before = {t: _read(spark, root, t).count() for t in ("crops", "embeddings", "scores", "cleaned")}
    (record,) = _ok(cluster.submit(job, *_overrides(root, local_demo[1]), master="local[1]")).json_lines()
    written = {"ingest": "written", "embed": "written", "score": "inserted", "clean": "cleaned_changed"}.get(job)
    if written:
        assert record["counts"][written] == 0, record["counts"]
    assert {t: _read(spark, root, t).count() for t in before} == before


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
    """Faults (a) and (d): 2,000 images plus 5% corrupt files; ingest quarantines exactly the corrupt
    ones with their reason; one worker is SIGKILLed while embed runs, and the job finishes on the
    other with exactly one embedding per crop."""
    root = tmp_path / "lake"
    n = 2000
    folder = _image_folder(tmp_path / "faces", range(n))
    corrupt = _corrupt_files(folder, n * 5 // 95)
    (ingest,) = _ok(cluster.submit("ingest", f"storage.root={root}", f"ingest.input_path={folder}",
                                   "spark.hive_metastore=false", "spark.shuffle_partitions=4")).json_lines()
    assert ingest["counts"] == {"read": n + len(corrupt), "written": n, "already_present": 0, "quarantined": len(corrupt)}
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
    first = _image_folder(tmp_path / "a", range(0, 300))
    second = _image_folder(tmp_path / "b", range(200, 500))  # 100 images in both (same bytes, other paths)
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
    assert crops.count() == crops.select("image_id").distinct().count() == 500
    records = [json.loads(line) for out, _ in outputs for line in out.splitlines() if line.startswith('{"')]
    assert sum(r["counts"]["written"] for r in records) == 500
    # a conflict, when the two commits met, was retried rather than fatal
    retried = sum(err.count("concurrent write") for _, err in outputs)
    print(f"concurrent ingests: write-conflict retries {retried}")


@pytest.fixture(scope="module")
def embed_ready_lake(cluster, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("broken_model_lake")
    folder = _image_folder(root / "faces", range(40))
    _ok(cluster.submit("ingest", f"storage.root={root / 'lake'}", f"ingest.input_path={folder}",
                       "spark.hive_metastore=false", "spark.shuffle_partitions=2"))
    return root / "lake"


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


@pytest.mark.parametrize("case", ["corrupt_file", "wrong_input_shape", "wrong_output_dim"])
def test_broken_model_fails_the_job(spark, cluster, embed_ready_lake, tmp_path, case) -> None:
    """Fault (c): a broken model: exit 2 with one line naming the problem, nothing quarantined."""
    spec = _broken_models(tmp_path)[case]
    result = cluster.submit("embed", f"storage.root={embed_ready_lake}", f"embed.model={spec}",
                            "spark.hive_metastore=false", "spark.shuffle_partitions=2")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.error_lines()
    assert {"corrupt_file": "cannot load ONNX model", "wrong_input_shape": "has shape",
            "wrong_output_dim": "-D embeddings"}[case] in line
    assert _quarantined(spark, embed_ready_lake, "embed") == 0


GPU_CONF = {"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1",
            "spark.task.maxFailures": "2"}


def test_cuda_required_but_missing_fails_on_the_executor(spark, cluster, embed_ready_lake) -> None:
    """Fault (c), executor side: Spark gives each task a (fake) GPU, ONNX Runtime here has no CUDA
    provider, embed.device=cuda: the task fails and the job exits 2 in one line; nothing quarantined."""
    result = cluster.submit("embed", f"storage.root={embed_ready_lake}", "embed.device=cuda",
                            "spark.hive_metastore=false", "spark.shuffle_partitions=2", conf=GPU_CONF)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.error_lines()
    assert "CUDAExecutionProvider" in line and "raised on an executor" in line
    assert _quarantined(spark, embed_ready_lake, "embed") == 0


def test_auto_device_reports_the_fallback_per_task(spark, cluster, embed_ready_lake) -> None:
    """embed.device=auto with a (fake) GPU per task: runs on CPU and the run log says so, per task."""
    result = _ok(cluster.submit("embed", f"storage.root={embed_ready_lake}", "embed.device=auto",
                                "spark.hive_metastore=false", "spark.shuffle_partitions=2", conf=GPU_CONF))
    (record,) = result.json_lines()
    devices = record["runtime"]["tasks_by_device"]
    assert devices and all(d.startswith("cpu CPUExecutionProvider (gpu ") for d in devices), devices
    assert record["counts"]["written"] == 40
