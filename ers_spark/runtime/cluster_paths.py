"""Paths every host of a cluster can reach.

On ``local[...]`` the driver and the executors are one process on one disk, so any folder works.
On a remote master (``spark://``, ``yarn``, ``k8s://``) the executors run on other hosts: a table
root, checkpoint folder or input folder on the driver's own disk is invisible to them, and Spark
fails deep inside a job (``Checkpoint RDD has a different number of partitions``,
``FileNotFoundException ... _delta_log``) after writing half a table. This module stops such a
run before any Spark work, in one line that names the key and what to use instead.

A path is *local* when it has no scheme or the ``file:`` scheme. ``spark.shared_filesystem: true``
says that such paths are one shared mount (NFS, Lustre) at the same place on every host.
"""

from __future__ import annotations

import re

from ers_spark.config import ErsConfig
from ers_spark.errors import ConfigError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def uri_scheme(path: str) -> str:
    """The scheme of a path or URI, lower-cased; ``""`` for a plain path.

    >>> uri_scheme("s3a://bucket/lake"), uri_scheme("file:///tmp/x"), uri_scheme("~/lake")
    ('s3a', 'file', '')
    """
    match = _SCHEME.match(path)
    return match.group(1).lower() if match and len(match.group(1)) > 1 else ""


def is_local_path(path: str) -> bool:
    """A path on one host's own disk: no scheme, or ``file:``.

    >>> is_local_path("/data/lake"), is_local_path("file:/data"), is_local_path("hdfs://nn/lake")
    (True, True, False)
    """
    return uri_scheme(path) in ("", "file")


def executors_on_other_hosts(master: str | None) -> bool:
    """Whether the executors may run on hosts other than the driver's (every master but ``local...``).

    >>> executors_on_other_hosts("local[2]"), executors_on_other_hosts("spark://10.0.0.1:7077")
    (False, True)
    """
    return bool(master) and not master.startswith("local")


def require_shared_paths(cfg: ErsConfig, master: str | None, paths: dict[str, str | None], hint: str = "") -> None:
    """Fail in one line when a path the executors must read or write lives on the driver's disk.

    ``paths`` maps each config key to its value (None: not set, nothing to check); ``hint`` ends the
    message with what else that key accepts.
    """
    if not executors_on_other_hosts(master) or cfg.spark.shared_filesystem:
        return
    for key, value in paths.items():
        if value and is_local_path(value):
            raise ConfigError(
                f"{key}={value} is a local path, but spark.master={master} runs executors on other hosts that "
                f"cannot see the driver's disk: use an object store or HDFS URI ({key}=s3a://bucket/...), or set "
                f"spark.shared_filesystem=true if this path is the same shared mount on every host{hint}"
            )


def stage_paths(cfg: ErsConfig, stage: str) -> dict[str, str | None]:
    """The paths a stage's executors read or write: the tables, the catalog's warehouse, the
    checkpoints, and the stage's own input (checked by the session factory before Spark starts)."""
    paths = {
        "storage.root": cfg.storage.root,
        "storage.warehouse_dir": cfg.storage.warehouse_dir,
        "spark.checkpoint_dir": cfg.spark.checkpoint_dir,
    }
    if stage == "ingest":
        paths["ingest.input_path"] = cfg.ingest.input_path
    elif stage == "import-embeddings":
        paths["import_embeddings.input_path"] = cfg.import_embeddings.input_path
    elif stage == "evaluate":
        paths["evaluate.pairs_path"] = cfg.evaluate.pairs_path
    return paths


def report_target(cfg: ErsConfig, master: str | None) -> str:
    """Where the report goes. On a remote master a bare local ``report.path`` stops the run: the
    report belongs in the store with the tables, or on the driver host when named as ``file:``."""
    raw = cfg.report.path
    if raw is None or uri_scheme(raw) != "file":
        hint = ", or name a file on the driver host as report.path=file:///path/report.html"
        require_shared_paths(cfg, master, {"report.path": raw}, hint)
    return cfg.report.output_path(cfg.storage)
