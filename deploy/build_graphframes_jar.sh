#!/usr/bin/env bash
# Build the GraphFrames jar for Spark 4 / Scala 2.13 from a source checkout, for sites whose Maven
# mirror does not serve io.graphframes (locate_ui.connected_components=graphframes needs it).
# No sbt: PySpark's own jars folder holds the Scala compiler and every compile dependency.
#
#   git clone --branch v0.11.0 https://github.com/graphframes/graphframes /tmp/graphframes-src
#   deploy/build_graphframes_jar.sh /tmp/graphframes-src /opt/ers-spark/jars [VERSION]
#   pip install graphframes-py==0.11.0            # the Python side, same version as the jar
#
# Then put the jar on the classpath: copy it into the folder named by `spark.jars_dir` (next to
# the Delta jars from deploy/fetch_jars.sh), or set `spark.conf: {spark.jars: /path/to/jar}`.
# The jar holds the core module and the graphx module it depends on. Takes about 2 minutes.
set -euo pipefail
src="$(cd "${1:?usage: deploy/build_graphframes_jar.sh GRAPHFRAMES_SRC DEST_DIR}" && pwd)"
dest="${2:?usage: deploy/build_graphframes_jar.sh GRAPHFRAMES_SRC DEST_DIR}"
for module in core graphx; do
  [[ -d "$src/$module/src/main" ]] || { echo "error: $src/$module/src/main not found; pass a graphframes checkout (v0.11.0 or later)" >&2; exit 2; }
done
jars="$(python -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "jars"))')"
scala_version="$(ls "$jars" | sed -n 's/^scala-library-\(2\.13\.[0-9]*\)\.jar$/\1/p' | head -1)"
[[ -n "$scala_version" ]] || { echo "error: no scala-library-2.13.x jar in $jars; is pyspark 4 installed?" >&2; exit 2; }
compiler="$jars/scala-compiler-$scala_version.jar:$jars/scala-library-$scala_version.jar:$jars/scala-reflect-$scala_version.jar"
# the version comes from the checkout's tag (upstream uses sbt-dynver), or the third argument
version="${3:-$(git -C "$src" describe --tags --exact-match 2>/dev/null | sed 's/^v//' || true)}"
version="${version:-local}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/graphx" "$work/core" "$dest"

compile() {  # compile MODULE_OUT CLASSPATH SOURCE_DIR...: scalac over Scala+Java, then javac over Java
  local out="$1" classpath="$2"; shift 2
  find "$@" \( -name '*.scala' -o -name '*.java' \) > "$work/srcs.txt"
  # -Xsource:3 is what upstream's sbt build sets (the sources use Scala 3 import syntax)
  java -Xmx2g -Xss8m -cp "$compiler" scala.tools.nsc.Main -release 17 -Xsource:3 -nowarn \
    -classpath "$classpath" -d "$out" @"$work/srcs.txt"
  if grep -q '\.java$' "$work/srcs.txt"; then
    grep '\.java$' "$work/srcs.txt" > "$work/java.txt"
    javac --release 17 -nowarn -cp "$out:$classpath" -d "$out" @"$work/java.txt"
  fi
}

compile "$work/graphx" "$jars/*" "$src/graphx/src/main"
shims=()
[[ -d "$src/core/src/main/scala-spark-4" ]] && shims=("$src/core/src/main/scala-spark-4")
compile "$work/core" "$work/graphx:$jars/*" "$src/core/src/main/scala" "${shims[@]}" \
  $( [[ -d "$src/core/src/main/java" ]] && echo "$src/core/src/main/java" )

mkdir -p "$work/stage/META-INF"
cp -r "$work/graphx/." "$work/core/." "$work/stage/"
cp "$src/LICENSE" "$work/stage/META-INF/LICENSE" 2>/dev/null || true
printf 'Manifest-Version: 1.0\nImplementation-Title: graphframes-spark4 core+graphx (built from source)\nImplementation-Version: %s\n' \
  "$version" > "$work/manifest.txt"
jar_path="$dest/graphframes-spark4_2.13-$version.jar"
jar --create --file "$jar_path" --manifest "$work/manifest.txt" -C "$work/stage" .
echo "built $jar_path (Scala $scala_version); install the Python side with: pip install graphframes-py==$version"
