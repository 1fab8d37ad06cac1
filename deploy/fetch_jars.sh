#!/usr/bin/env bash
# Fill a folder with the jars ers-spark needs (Delta Lake and its dependencies; with `s3a` in the
# config's spark.packages also Hadoop's S3A connector, the AWS SDK's S3 modules and ers-spark's
# multi-writer Delta LogStore, built by deploy/build_logstore_jar.sh), for clusters without internet
# access. Run it once on a machine that reaches Maven Central, copy the folder to the cluster, and set
# `spark.jars_dir: /that/folder` in the config (or ERS_SPARK_JARS_DIR for deploy/ers-submit).
#   usage: deploy/fetch_jars.sh /opt/ers-spark/jars [config.yaml]
set -euo pipefail
dest="${1:?usage: deploy/fetch_jars.sh DEST_DIR [config.yaml]}"
config="${2:-}"
mkdir -p "$dest"
python - "$dest" "$config" <<'PY'
import shutil, sys, tempfile
from pathlib import Path
from ers_spark.config import load_config
from ers_spark.runtime.session import build_session
dest, config = Path(sys.argv[1]), sys.argv[2] or None
ivy = Path(tempfile.mkdtemp(prefix="ers-ivy-"))
# Spark resolves spark.jars.packages with Ivy when the session starts: point Ivy at a fresh folder, copy what it fetched.
cfg = load_config(config, ["spark.master=local[1]", "spark.jars_dir=null", "spark.hive_metastore=false",
                           f"storage.root={ivy / 'lake'}", f"spark.conf={{spark.jars.ivy: '{ivy}'}}"])
build_session(cfg, "fetch-jars").stop()
jars = sorted((ivy / "jars").glob("*.jar"))
for jar in jars:
    shutil.copy2(jar, dest / jar.name)
print(f"{len(jars)} jars copied to {dest}; set spark.jars_dir: {dest}")
if any("hadoop-aws" in jar.name for jar in jars):
    open(dest / ".needs-logstore", "w").close()
PY
if [ -e "$dest/.needs-logstore" ]; then
  rm -f "$dest/.needs-logstore"
  "$(dirname "$0")/build_logstore_jar.sh" "$dest"
fi
