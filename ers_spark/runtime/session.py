"""The one SparkSession factory: CLI, spark-submit jobs and tests all build their session here.

Nothing else in the project calls ``SparkSession.builder``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pyspark import SparkContext
from pyspark.sql import SparkSession

from ers_spark.config import ErsConfig
from ers_spark.errors import ErsUserError
from ers_spark.runtime.cluster_paths import require_shared_paths, stage_paths
from ers_spark.runtime.logs import QUIET_LOG4J, add_java_option, hidden_ivy_output, is_verbose, quiet_java_option
from ers_spark.runtime.shipping import ship_code
from ers_spark.versions import DELTA_PACKAGE, EXCLUDED_PACKAGES

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


def running_under_spark_submit() -> bool:
    """spark-submit starts the JVM first and hands Python its gateway port."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def session_settings(cfg: ErsConfig, stage: str) -> dict[str, str]:
    """Every Spark setting the project applies, as a plain dict (tested without a JVM)."""
    spark = cfg.spark
    settings = _base_settings(cfg, stage)
    settings.update(_launch_settings(cfg))
    settings.update(_catalog_settings(cfg))
    if not is_verbose() and QUIET_LOG4J.is_file():  # conf/log4j2-quiet.properties; --verbose keeps Spark's
        java_options = add_java_option(settings.get("spark.driver.extraJavaOptions"), quiet_java_option())
        settings["spark.driver.extraJavaOptions"] = java_options
    settings.update(spark.conf)
    return settings


def _base_settings(cfg: ErsConfig, stage: str) -> dict[str, str]:
    """Settings every session gets: app name, Delta, Arrow batches, shuffle width, quiet console."""
    spark = cfg.spark
    return {
        "spark.app.name": f"{spark.app_name_prefix}-{stage}",
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(spark.arrow_max_records_per_batch),
        "spark.sql.execution.arrow.maxBytesPerBatch": spark.arrow_max_bytes_per_batch,
        "spark.sql.shuffle.partitions": str(spark.shuffle_partitions),
        "spark.ui.showConsoleProgress": "false",
        # Delta MERGE on image_id: keep the source deterministic across retries
        "spark.databricks.delta.merge.repartitionBeforeWrite.enabled": "true",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        # connected components checkpoints reliably into spark.checkpoint_dir; remove the files once unused
        "spark.cleaner.referenceTracking.cleanCheckpoints": "true",
    }


def _launch_settings(cfg: ErsConfig) -> dict[str, str]:
    """Master, driver memory and jars; spark-submit's own command line wins for master and memory."""
    spark = cfg.spark
    settings: dict[str, str] = {}
    if spark.master and not running_under_spark_submit():
        settings["spark.master"] = spark.master
    if spark.driver_memory and not running_under_spark_submit():
        settings["spark.driver.memory"] = spark.driver_memory
    if spark.jars_dir:
        jars = sorted(str(p) for p in Path(spark.jars_dir).glob("*.jar"))
        settings["spark.jars"] = ",".join(jars)
    elif spark.packages:
        settings["spark.jars.packages"] = ",".join(spark.packages)
        settings["spark.jars.excludes"] = ",".join(EXCLUDED_PACKAGES)
    return settings


def _catalog_settings(cfg: ErsConfig) -> dict[str, str]:
    """Warehouse folder and catalog: Hive (a local Derby metastore under a local root) or in-memory."""
    spark = cfg.spark
    local_root = cfg.storage.local_root()
    warehouse = cfg.storage.warehouse_dir or (
        str(local_root / "_warehouse") if local_root is not None else f"{cfg.storage.root.rstrip('/')}/_warehouse"
    )
    settings = {"spark.sql.warehouse.dir": os.path.expanduser(warehouse)}
    if spark.hive_metastore:
        settings["spark.sql.catalogImplementation"] = "hive"
        if local_root is not None and "spark.hadoop.hive.metastore.uris" not in spark.conf:
            metastore = local_root / "_metastore_db"
            settings["spark.hadoop.javax.jdo.option.ConnectionURL"] = (
                f"jdbc:derby:;databaseName={metastore};create=true"
            )
            settings["spark.driver.extraJavaOptions"] = f"-Dderby.system.home={local_root}"
    else:
        settings["spark.sql.catalogImplementation"] = "in-memory"
    return settings


def require_delta(jvm: Any, cfg: ErsConfig) -> None:
    """Fail in one line when Delta Lake's jar is not on the driver's classpath.

    Spark only warns when a session extension class is missing; the first Delta call
    would then fail with a Py4J traceback. Under spark-submit the builder's
    ``spark.jars.packages`` comes too late: the jar must be on the command line.
    """
    from py4j.java_gateway import JavaClass

    if isinstance(jvm.io.delta.tables.DeltaTable, JavaClass):
        return
    packages = ",".join(cfg.spark.packages) or DELTA_PACKAGE
    raise ErsUserError(
        f"Delta Lake's classes are not on the classpath ({DELTA_EXTENSION} not found): add "
        f"--packages {packages} to spark-submit (or --jars from deploy/fetch_jars.sh), or submit with deploy/ers-submit"
    )


def planned_master(cfg: ErsConfig) -> str | None:
    """The master the session will get, known before it starts: spark-submit's (its JVM already holds
    ``spark.master``), else the config's."""
    if running_under_spark_submit():
        from pyspark import SparkConf

        SparkContext._ensure_initialized()
        return SparkConf().get("spark.master", None)
    return cfg.spark.master


def require_log_stores(jvm: Any, cfg: ErsConfig) -> None:
    """Fail in one line when a Delta LogStore the config names (``spark.delta.logStore.<scheme>.impl``)
    is not on the classpath; Delta would otherwise fail at the first commit, after the stage's work."""
    from py4j.java_gateway import JavaClass

    for key, name in cfg.spark.conf.items():
        if key.startswith("spark.delta.logStore.") and key.endswith(".impl"):
            found = jvm
            for part in name.split("."):
                found = getattr(found, part)
            if not isinstance(found, JavaClass):
                raise ErsUserError(
                    f"{key}={name} is not on the classpath: fill a jars folder with deploy/fetch_jars.sh (it builds "
                    "ers-spark's LogStore jar) and use it as spark.jars_dir or ERS_SPARK_JARS_DIR"
                )


def build_session(cfg: ErsConfig, stage: str) -> SparkSession:
    """Build (or reuse) the SparkSession for ``stage`` from the validated config.

    When a session already runs in this process (tests, the whole-pipeline job),
    it is reused and only its app-independent runtime settings are refreshed.
    """
    active = SparkSession.getActiveSession()
    require_shared_paths(cfg, active.sparkContext.master if active else planned_master(cfg), stage_paths(cfg, stage))
    local_root = cfg.storage.local_root()
    if local_root is not None:
        local_root.mkdir(parents=True, exist_ok=True)
    if active is not None:
        spark = active
    else:
        if running_under_spark_submit():
            # the JVM is already up: check its classpath before Spark warns with a stack trace
            SparkContext._ensure_initialized()
            require_delta(SparkContext._jvm, cfg)
        builder = SparkSession.builder
        for key, value in session_settings(cfg, stage).items():
            builder = builder.config(key, value)
        with hidden_ivy_output(not is_verbose() and not running_under_spark_submit(), cfg.spark):
            spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel(cfg.spark.log_level)
        require_delta(spark._jvm, cfg)
        require_log_stores(spark._jvm, cfg)
        ship_code(spark.sparkContext)
    spark.sparkContext.setJobGroup(stage, f"ers-spark {stage}")
    checkpoint_dir = os.path.expanduser(cfg.spark.checkpoint_dir)
    spark.sparkContext.setCheckpointDir(checkpoint_dir)
    spark.conf.set("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.spark.arrow_max_records_per_batch))
    return spark
