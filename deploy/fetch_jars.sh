#!/usr/bin/env bash
# Fill a folder with the jars ers-spark needs (Delta Lake and its dependencies), for clusters
# without internet access. Run it once on a machine that reaches Maven Central, copy the folder
# to the cluster, and set `spark.jars_dir: /that/folder` in the config.
#   usage: deploy/fetch_jars.sh /opt/ers-spark/jars [config.yaml]
set -euo pipefail
dest="${1:?usage: deploy/fetch_jars.sh DEST_DIR [config.yaml]}"
config="${2:-}"
mkdir -p "$dest"
python - "$dest" "$config" <<'PY'
import shutil, sys, tempfile
from pathlib import Path
from ers_spark.config import load_config
dest, config = Path(sys.argv[1]), sys.argv[2] or None
cfg = load_config(config)
ivy = Path(tempfile.mkdtemp(prefix="ers-ivy-"))
# Spark resolves spark.jars.packages with Ivy at session start; point Ivy at a fresh folder and copy what it fetched.
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master("local[1]").config("spark.jars.packages", ",".join(cfg.spark.packages))
         .config("spark.jars.ivy", str(ivy)).getOrCreate())
spark.stop()
jars = sorted((ivy / "jars").glob("*.jar"))
for jar in jars:
    shutil.copy2(jar, dest / jar.name)
print(f"{len(jars)} jars copied to {dest}; set spark.jars_dir: {dest}")
PY
