"""Spark stages, one module each: a thin ``run_<stage>(spark, cfg)`` over :mod:`ers_spark.core`.

Stages import core, lake and models; nothing below them imports a stage.
"""
