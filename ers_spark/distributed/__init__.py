"""Distributed algorithms: the Spark side of the pure functions in :mod:`ers_spark.core` (and of the models' inference).

Each module sits beside the core module whose functions it runs on Spark (``cells`` beside
``core.cells``, ``linkage`` beside ``core.linkage``, ``ui_cluster`` beside ``core.ui_cluster``, and
so on). A stage (:mod:`ers_spark.stages`) reads its input, checks its contract, calls these, writes
and returns its run record; nothing here writes a table, and nothing here imports a stage.
"""
