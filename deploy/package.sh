#!/usr/bin/env bash
# Build what spark-submit ships with an ers-spark job.
#   deploy/package.sh [DEST]          -> DEST/ers_spark.zip        (for --py-files; DEST defaults to dist/)
#   deploy/package.sh --env [DEST]    -> also DEST/ers_spark_env.tar.gz, the active virtualenv packed with
#                                        venv-pack (pip install venv-pack) for --archives ...#env
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
with_env=0
if [ "${1:-}" = "--env" ]; then with_env=1; shift; fi
dest=${1:-$here/dist}
mkdir -p "$dest"
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" python -m ers_spark.runtime.shipping "$dest"
if [ "$with_env" = 1 ]; then
  if ! command -v venv-pack >/dev/null 2>&1; then
    echo "package.sh: venv-pack not found: pip install venv-pack inside the virtualenv to pack" >&2
    exit 2
  fi
  if [ -z "${VIRTUAL_ENV:-}" ]; then
    echo "package.sh: --env packs the active virtualenv; activate one that has ers-spark's dependencies" >&2
    exit 2
  fi
  venv-pack -f -o "$dest/ers_spark_env.tar.gz"
  echo "$dest/ers_spark_env.tar.gz"
fi
