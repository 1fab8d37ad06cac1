"""Pure numpy/scipy math: ERS, single linkage on eps-neighbour graphs, synthetic data.

Nothing here imports pyspark (a test enforces it); the only project import allowed is
:mod:`ers_spark.errors`. The Spark stages wrap these functions.
"""
