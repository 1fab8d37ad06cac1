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

__all__ = ["DELTA_PACKAGE", "GRAPHFRAMES_PACKAGE", "PACKAGES"]

# Delta Lake for Spark 4.2 / Scala 2.13 (pyspark==4.2.0); the delta-spark Python package is the same version
DELTA_PACKAGE = "io.delta:delta-spark_4.2_2.13:4.4.0"
# GraphFrames for Spark 4 / Scala 2.13, only for locate_ui.connected_components=graphframes
# (pip install graphframes-py of the same version; deploy/build_graphframes_jar.sh builds this jar)
GRAPHFRAMES_PACKAGE = "io.graphframes:graphframes-spark4_2.13:0.11.0"

PACKAGES: dict[str, str] = {"delta": DELTA_PACKAGE, "graphframes": GRAPHFRAMES_PACKAGE}
