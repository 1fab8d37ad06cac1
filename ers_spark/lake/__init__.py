"""The Delta lake: table contracts, MERGE helpers, table versions and the run log.

Imports only :mod:`ers_spark.config`, :mod:`ers_spark.errors` and its own modules. The SparkSession
and the job's logging live in :mod:`ers_spark.runtime`.
"""
