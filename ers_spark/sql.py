"""``ers-spark sql``: run a query against the ``ers`` database and format the result as a text table."""

from __future__ import annotations

from ers_spark.config import ErsConfig
from ers_spark.lake.contracts import LAKE_TABLES
from ers_spark.lake.tables import register_table, table_exists
from ers_spark.runtime.session import build_session


def register_existing_tables(cfg: ErsConfig) -> list[str]:
    """(Re-)register every table that exists under storage.root, e.g. after the metastore was moved."""
    spark = build_session(cfg, "sql")
    names = []
    for contract in LAKE_TABLES.values():
        if table_exists(spark, cfg, contract):
            register_table(spark, cfg, contract)
            names.append(contract.name)
    return names


def run_sql(cfg: ErsConfig, query: str, limit: int = 50) -> str:
    """Run ``query`` and return at most ``limit`` rows as an aligned text table.

    Examples
    --------
    >>> print(run_sql(cfg, "SELECT count(*) AS n FROM ers.crops"))   # doctest: +SKIP
      n
    411
    """
    spark = build_session(cfg, "sql")
    register_existing_tables(cfg)
    spark.catalog.setCurrentDatabase(cfg.storage.database)
    df = spark.sql(query)
    pdf = df.limit(limit).toPandas()
    if pdf.empty:
        return "(no rows)"
    return pdf.to_string(index=False, max_colwidth=60)
