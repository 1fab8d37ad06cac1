"""The Delta lake: session factory, table contracts, MERGE helpers, versions and the run log.

Imports only :mod:`ers_spark.config`, :mod:`ers_spark.errors` and its own modules.
"""
