"""spark-submit entry point: `spark-submit jobs/maintain.py [--config conf.yaml] [section.key=value ...]`."""

from ers_spark.cli import job_main

if __name__ == "__main__":
    job_main("maintain")
