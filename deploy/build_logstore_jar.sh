#!/usr/bin/env bash
# Build ers-spark's Delta LogStore for several writing drivers on S3 (deploy/delta-logstore: a commit
# is a conditional PUT) into DEST/ers-spark-delta-logstore.jar. deploy/fetch_jars.sh runs it when the
# config lists the s3a package; it needs a JDK (javac, jar) and compiles against Delta's storage jar
# in DEST and the Hadoop client that pyspark bundles.
#   usage: deploy/build_logstore_jar.sh DEST_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest="${1:?usage: deploy/build_logstore_jar.sh DEST_DIR (holding io.delta_delta-storage-*.jar)}"
storage=$(find "$dest" -maxdepth 1 -name '*delta-storage-*.jar' | head -1)
[ -n "$storage" ] || { echo "build_logstore_jar: no delta-storage jar in $dest (run deploy/fetch_jars.sh)" >&2; exit 2; }
command -v javac >/dev/null && command -v jar >/dev/null \
  || { echo "build_logstore_jar: needs a JDK (javac and jar on PATH)" >&2; exit 2; }
spark_jars=$(python -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "jars"))')
hadoop_api=$(find "$spark_jars" -maxdepth 1 -name 'hadoop-client-api-*.jar' | head -1)
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
javac --release 17 -nowarn -d "$build" -cp "$hadoop_api:$storage" "$here"/delta-logstore/io/ersspark/delta/*.java
jar cf "$dest/ers-spark-delta-logstore.jar" -C "$build" .
echo "built $dest/ers-spark-delta-logstore.jar"
