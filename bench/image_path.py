"""Image path of the scale benchmark: ingest + embed of JPEG crops from one Parquet file, new code vs old.

    python bench/image_path.py --make N PATH         # write N JPEG crops (ORL variants) to PATH
    python bench/image_path.py --run N PATH ROOT     # ingest + embed them with the ers_spark on PYTHONPATH

``bench/scale.py`` calls both, once with today's code and once with the code before issue 13
(a detached worktree of ``OLD_COMMIT``), in the same run, and records images per second per core.
The crops are the shared ORL faces (400 crops) in variants made here: mirrored, shifted,
brightened or darkened, some downscaled 4x and back, each saved as JPEG (quality 90), so every
crop has its own bytes. Spark is ``local[2]``; the timed sections follow a warm-up on 64 crops.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "orl_faces"
OLD_COMMIT = "eb446c5"  # main just before issue 13's work began
CORES = 2


def _variant(img, k: int):
    """The k-th variant of a base crop: mirror, shift, brightness and (every fourth) a 4x downscale."""
    from PIL import Image, ImageEnhance, ImageOps

    w, h = img.size
    v = ImageOps.mirror(img) if k % 2 else img
    shift = (k // 2) % 5
    if shift:
        v = v.crop((shift, shift, w - shift, h - shift)).resize((w, h))
    v = ImageEnhance.Brightness(v).enhance(0.5 + 0.04 * ((k // 10) % 25))
    if k % 4 == 3:
        v = v.resize((w // 4, h // 4), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    return v


def make_input(n: int, path: Path) -> None:
    """n JPEG crops with path and identity columns, written in row groups of 10,000."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    files = sorted(SHARED.glob("s*/*.pgm"))
    if not files:
        raise SystemExit(f"the image path needs the shared ORL faces at {SHARED}")
    base = [(f.parent.name, Image.open(f).convert("RGB")) for f in files]
    schema = pa.schema([("bytes", pa.binary()), ("path", pa.string()), ("identity", pa.string())])
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, 10_000):
            rows = {"bytes": [], "path": [], "identity": []}
            for i in range(start, min(n, start + 10_000)):
                person, img = base[i % len(base)]
                buf = io.BytesIO()
                _variant(img, i // len(base)).save(buf, format="JPEG", quality=90)
                rows["bytes"].append(buf.getvalue())
                rows["path"].append(f"orl/{person}/{i}.jpg")
                rows["identity"].append(person)
            writer.write_table(pa.table(rows, schema=schema))


def _config(root: Path, data: Path):
    from ers_spark.config import load_config

    return load_config(overrides=[
        f"storage.root={root / 'lake'}", "storage.database=ers_image_path", f"spark.checkpoint_dir={root / 'ckpt'}",
        f"spark.master=local[{CORES}]", "spark.driver_memory=6g", "spark.shuffle_partitions=16",
        "spark.hive_metastore=false", f"ingest.input_path={data}", "ingest.input_format=parquet",
        "ingest.identity_column=identity", "ingest.path_column=path", "embed.intra_op_threads=1",
    ])


def run(n: int, data: Path, root: Path) -> dict:
    """Ingest then embed ``data`` into a fresh lake under ``root``; seconds and images/s/core for each."""
    import shutil

    try:
        from ers_spark.runtime.session import build_session
    except ImportError:  # the old code of the comparison (before the runtime/ package)
        from ers_spark.lake.session import build_session  # type: ignore[no-redef]
    from ers_spark.stages.embed import run_embed
    from ers_spark.stages.ingest import run_ingest

    shutil.rmtree(root, ignore_errors=True)
    warm_data = root / "warm.parquet"
    make_input(64, warm_data)
    spark = build_session(_config(root / "warm", warm_data), "image-path")
    run_ingest(spark, _config(root / "warm", warm_data))
    run_embed(spark, _config(root / "warm", warm_data))
    cfg = _config(root, data)
    # per core = per Spark task slot (CORES); the machine's own count says whether JVM threads had more cores
    # to run on than that (a run on a bigger machine gave more images/s "per core" than one core can embed)
    out: dict = {"crops": n, "machine_cores": os.cpu_count()}
    for stage, fn in (("ingest", run_ingest), ("embed", run_embed)):
        start = time.perf_counter()
        record = fn(spark, cfg)
        seconds = time.perf_counter() - start
        out[f"{stage}_s"] = round(seconds, 1)
        out[f"{stage}_images_per_s_per_core"] = round(n / seconds / CORES, 1)
        out[f"{stage}_counts"] = record.get("counts", {})
    spark.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make", nargs=2, metavar=("N", "PATH"))
    parser.add_argument("--run", nargs=3, metavar=("N", "PATH", "ROOT"))
    args = parser.parse_args()
    if args.make:
        make_input(int(args.make[0]), Path(args.make[1]))
    if args.run:
        code = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
        sys.path.insert(0, code)
        result = run(int(args.run[0]), Path(args.run[1]), Path(args.run[2]))
        print("RESULT " + json.dumps({**result, "code": code}), flush=True)


if __name__ == "__main__":
    main()
