"""The HTML report: plain content values -> figures (matplotlib, Agg) -> one self-contained page (jinja2).

Nothing here imports pyspark (a test enforces it): :mod:`ers_spark.stages.report`
reads the tables and fills :class:`ers_spark.report.content.ReportContent`.
"""
