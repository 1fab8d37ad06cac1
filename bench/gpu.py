"""GPU check of the embed stage's per-partition function, for a machine with an NVIDIA GPU, Python and PyTorch but
no Java and no network (the `device` tool's machine).

    python bench/gpu.py prepare            # here: .gpu-carry/ (model, pure-Python deps, commit), < 64 MiB
    PYTHONPATH=.gpu-carry/site python bench/gpu.py run --out $OUT/embed_gpu.json     # there

``run`` makes JPEG crops in code (150 px, quality 90), cuts them into Arrow record batches of 256 rows as
Spark's ``mapInArrow`` hands them over, and times two things on the same crops:

- ``gpu_raw_ips``: the torch backend alone (``TorchEmbedder.embed``, fp16) over the same crops already decoded
  and normalised into float32 batches: what the GPU does when it is fed;
- ``gpu_fn_ips``: the embed stage's own per-partition function (``make_embed_batches``, the function
  ``mapInArrow`` runs in every task: decode, preprocess, inference through the torch backend in fp16, Arrow
  output) on the Arrow batches, one Python process as one Spark task;
- ``gpu_ratio_fn_vs_raw`` = fn / raw (target >= 0.5: decoding on the task's CPU core must not starve the GPU).

The model is the default dlib network (the ONNX file ers-spark converts, run through onnx2torch), with
``embed.align=false`` (no dlib on that machine: the crops count as chips already cut). Results go to their own
JSON (``bench/results/embed_gpu.json``), one run with its commit, never merged into ``embed.json``'s CPU run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu-carry"
sys.path.insert(0, str(ROOT))

# what `run` imports beyond what the GPU image has (torch, numpy, pyarrow, Pillow, PyYAML, onnx): pure Python
CARRIED_PACKAGES = ("pyspark", "py4j", "onnx2torch")
ROWS_PER_BATCH = 256  # spark.sql.execution.arrow.maxRecordsPerBatch in conf/cluster.example.yaml
TARGET_RATIO = 0.5


def prepare() -> None:
    """Fill ``.gpu-carry/``: the converted dlib ONNX file, the pure-Python packages `run` needs (pyspark without
    its jars), and the commit, so the GPU machine needs only torch, numpy, pyarrow and Pillow."""
    import importlib

    from ers_spark.config import load_config
    from ers_spark.models.spec import load_model_spec, resolve_model_file

    shutil.rmtree(CARRY, ignore_errors=True)
    site = CARRY / "site"
    site.mkdir(parents=True)
    for name in CARRIED_PACKAGES:
        folder = Path(importlib.import_module(name).__file__).parent
        shutil.copytree(folder, site / name, ignore=shutil.ignore_patterns("jars", "__pycache__", "*.so", "tests",
                                                                          "examples", "data", "benchmarks"))
    model = resolve_model_file(load_model_spec("dlib_resnet_v1"), os.path.expanduser(load_config().embed.model_cache_dir))
    shutil.copy2(model, CARRY / model.name)
    from provenance import COMMIT, TREE_DIRTY  # bench/, beside this script: the same record every bench writes

    (CARRY / "commit.json").write_text(json.dumps({"commit": COMMIT, "tree_dirty": TREE_DIRTY}))
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file())
    print(f"{CARRY}: {size / 2**20:.1f} MiB (carry limit 64 MiB)")


def make_crop_batches(n: int, seed: int = 0) -> list:
    """n distinct 150 px JPEG crops (smooth random blobs, quality 90) in Arrow batches of (image_id, bytes)."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:150, 0:150].astype(np.float32)
    crops = []
    for i in range(n):
        img = np.zeros((150, 150, 3), np.float32)
        for _ in range(6):
            cy, cx, r = rng.uniform(20, 130), rng.uniform(20, 130), rng.uniform(10, 50)
            img += rng.uniform(40, 120, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        buf = io.BytesIO()
        Image.fromarray(np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        crops.append(buf.getvalue())
    ids = [f"crop{i:07d}" for i in range(n)]
    schema = pa.schema([pa.field("image_id", pa.string(), False), pa.field("bytes", pa.binary())])
    return [pa.RecordBatch.from_arrays([pa.array(ids[s:s + ROWS_PER_BATCH]), pa.array(crops[s:s + ROWS_PER_BATCH])],
                                       schema=schema) for s in range(0, n, ROWS_PER_BATCH)]


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from ers_spark.config import load_config
    from ers_spark.distributed.inference import ModelFile, get_embedder, make_embed_batches, model_version
    from ers_spark.models.preprocess import decode_images, prepare_arrays
    from ers_spark.models.spec import file_sha256, load_model_spec

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench/gpu.py: torch {torch.__version__} sees no CUDA device; use --device cpu for a dry run")
    device_id = 0 if args.device == "cuda" else None
    emb = load_config(overrides=["embed.backend=torch", f"embed.fp16={str(args.device == 'cuda').lower()}",
                                 "embed.align=false", f"embed.batch_size={args.batch_size}",
                                 f"embed.device={args.device}"]).embed
    spec = load_model_spec("dlib_resnet_v1")
    digest = file_sha256(args.model)
    params = ModelFile(spec=spec, model_path=str(args.model), model_sha256=digest,
                       model_version=model_version(spec, digest, emb, None))
    batches = make_crop_batches(args.crops)
    decoded, _ = decode_images([b for batch in batches for b in batch.column(1).to_pylist()], spec)
    floats = [prepare_arrays(decoded[s:s + args.batch_size], spec) for s in range(0, len(decoded), args.batch_size)]

    embedder = get_embedder(params, emb, device_id)  # loaded once, as in a Python worker
    embedder.embed(floats[0])  # warm-up: CUDA context, kernels
    raw_seconds = min(_timed(lambda: [embedder.embed(f) for f in floats]) for _ in range(args.repeats))
    embed_partition = make_embed_batches(params, emb, device_id=device_id)
    list(embed_partition(iter(batches[:1])))
    out: list = []
    fn_seconds = min(_timed(lambda: out.__setitem__(slice(None), list(embed_partition(iter(batches)))))
                     for _ in range(args.repeats))
    rows = sum(b.num_rows for b in out)
    failed = sum(b.column(3).null_count != b.num_rows for b in out)
    assert rows == args.crops and failed == 0, (rows, failed)
    raw_ips, fn_ips = args.crops / raw_seconds, args.crops / fn_seconds
    carried = json.loads((CARRY / "commit.json").read_text()) if (CARRY / "commit.json").is_file() else {}
    return {
        "commit": carried.get("commit"), "tree_dirty": carried.get("tree_dirty"), "run_started": started,
        "device": torch.cuda.get_device_name(0) if device_id is not None else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "python": platform.python_version(), "runtime": embedder.runtime,
        "model_version": params.model_version, "crops": args.crops, "batch_size": args.batch_size,
        "rows_per_arrow_batch": ROWS_PER_BATCH, "repeats": args.repeats,
        "gpu_raw_ips": round(raw_ips, 1), "gpu_fn_ips": round(fn_ips, 1),
        "gpu_ratio_fn_vs_raw": round(fn_ips / raw_ips, 3), "target_ratio": TARGET_RATIO,
        "target_met": fn_ips / raw_ips >= TARGET_RATIO,
        "raw_seconds": round(raw_seconds, 3), "fn_seconds": round(fn_seconds, 3),
        "embedding_norm_mean": float(np.mean([np.mean(b.column(2).to_numpy(zero_copy_only=False)) for b in out])),
    }


def _timed(work) -> float:
    import torch

    start = time.perf_counter()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="fill .gpu-carry/ here (model, pure-Python packages, commit)")
    go = sub.add_parser("run", help="time the raw model and the per-partition function (on the GPU machine)")
    go.add_argument("--model", type=Path, default=CARRY / "dlib_resnet_v1.onnx")
    go.add_argument("--crops", type=int, default=8192)
    go.add_argument("--batch-size", type=int, default=256)
    go.add_argument("--repeats", type=int, default=3)
    go.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    go.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "embed_gpu.json")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare()
        return
    result = run(args)
    if args.device == "cpu" and args.out == ROOT / "bench" / "results" / "embed_gpu.json":
        args.out = Path("/tmp/embed_gpu_dry_run.json")  # a CPU dry run never lands in bench/results
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
