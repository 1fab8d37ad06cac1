"""Every run-time version pin in one place: the jars Spark loads besides its own, by Maven coordinate.

A config's ``spark.packages`` names them by the keys of :data:`PACKAGES` (``packages: [delta]``,
``[delta, graphframes]``) and the config loader fills in these coordinates; an entry with a ``:``
is a Maven coordinate used as written. :func:`ers_spark.runtime.session.require_delta` names
:data:`DELTA_PACKAGE` when Delta's jar is missing. No imports: the config loader and the deploy
scripts read it before any JVM exists.

The Python packages are pinned in ``pyproject.toml``; each jar must match its Python side (the
Spark and Scala versions in a coordinate match pyspark's, delta-spark's version matches
:data:`DELTA_PACKAGE`'s, graphframes-py's matches :data:`GRAPHFRAMES_PACKAGE`'s).
``tests/test_versions.py`` fails when ``pyproject.toml``, the README, the Airflow DAG
(``deploy/airflow/ers_spark_dag.py``, which runs where ers-spark is not installed and so keeps a
literal) or a shipped config disagree with this module.

>>> PACKAGES["delta"] == DELTA_PACKAGE
True
"""

from __future__ import annotations

__all__ = ["AWS_SDK_S3_PACKAGES", "DELTA_PACKAGE", "EXCLUDED_PACKAGES", "GRAPHFRAMES_PACKAGE", "HADOOP_AWS_PACKAGE",
           "PACKAGES", "VERSITYGW_MODULE"]

# Delta Lake for Spark 4.2 / Scala 2.13 (pyspark==4.2.0); the delta-spark Python package is the same version
DELTA_PACKAGE = "io.delta:delta-spark_4.2_2.13:4.4.0"
# GraphFrames for Spark 4 / Scala 2.13, only for locate_ui.connected_components=graphframes
# (pip install graphframes-py of the same version; deploy/build_graphframes_jar.sh builds this jar)
GRAPHFRAMES_PACKAGE = "io.graphframes:graphframes-spark4_2.13:0.11.0"

# Hadoop's S3A connector (s3a:// tables, checkpoints, input, report): the version of the Hadoop client
# pyspark 4.2.0 bundles, and the two AWS SDK v2 modules S3A calls instead of the SDK's 686 MB bundle
HADOOP_AWS_PACKAGE = "org.apache.hadoop:hadoop-aws:3.5.0"
AWS_SDK_S3_PACKAGES = ("software.amazon.awssdk:s3:2.35.4", "software.amazon.awssdk:s3-transfer-manager:2.35.4")
# Never resolved (spark.jars.excludes / --exclude-packages): the SDK bundle hadoop-aws declares, and the
# second Hadoop client (3.4.2) that Delta 4.4 brings through unitycatalog-hadoop beside pyspark's own
EXCLUDED_PACKAGES = ("software.amazon.awssdk:bundle", "org.apache.hadoop:hadoop-client-api",
                     "org.apache.hadoop:hadoop-client-runtime")

# The S3-compatible server the object-store tests start (Versity's gateway over a folder); .ci/run
# builds it with `go install` once and caches the binary
VERSITYGW_MODULE = "github.com/versity/versitygw/cmd/versitygw@v1.8.0"

# A name a config may list in spark.packages -> its Maven coordinates (comma-separated when several)
PACKAGES: dict[str, str] = {"delta": DELTA_PACKAGE, "graphframes": GRAPHFRAMES_PACKAGE,
                            "s3a": ",".join((HADOOP_AWS_PACKAGE, *AWS_SDK_S3_PACKAGES))}
