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
PY
