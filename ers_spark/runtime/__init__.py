"""The job's runtime: its SparkSession, its log output, progress lines and the code shipped to executors.

* :mod:`~ers_spark.runtime.session`: the one SparkSession factory;
* :mod:`~ers_spark.runtime.logs`: Python logging, the JVM's log4j2 config, Ivy's output;
* :mod:`~ers_spark.runtime.progress`: progress lines from Spark's status tracker;
* :mod:`~ers_spark.runtime.shipping`: the ``ers_spark`` code zip for the executors.

Imports only :mod:`ers_spark.config`, :mod:`ers_spark.errors`, :mod:`ers_spark.versions` and its own modules.
"""
