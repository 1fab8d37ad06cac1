"""ers-spark: embedding recognizability scores (ERS) for face crops on Apache Spark and Delta Lake."""

__version__ = "0.1.0"
