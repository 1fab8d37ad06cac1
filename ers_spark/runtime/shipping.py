"""What a Spark application ships to its executors: the ``ers_spark`` code as a zip for ``--py-files``.

``deploy/package.sh`` builds the same zip ahead of time (``python -m ers_spark.runtime.shipping DIR``);
a session on a cluster master that was not given one builds it on the fly and adds it
with ``SparkContext.addPyFile``, so executors never depend on an install of their own.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import zipfile
from pathlib import Path

from ers_spark.errors import ErsUserError

log = logging.getLogger(__name__)

ZIP_NAME = "ers_spark.zip"
_SHIPPED_SUFFIXES = (".py", ".yaml", ".properties")


def package_dir() -> Path:
    return Path(__file__).resolve().parents[1]


def build_code_zip(dest_dir: str | os.PathLike[str]) -> Path:
    """Write ``ers_spark.zip`` (the package's sources and configs, deterministic order) into ``dest_dir``."""
    root = package_dir()
    if not root.is_dir():
        raise ErsUserError(f"ers_spark is imported from {root}, not a folder: build the code zip from an installed or source copy")
    dest = Path(dest_dir) / ZIP_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in _SHIPPED_SUFFIXES and "__pycache__" not in path.parts:
                info = zipfile.ZipInfo(str(Path("ers_spark") / path.relative_to(root)), date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, path.read_bytes())
    os.replace(tmp, dest)
    return dest


def is_local_master(master: str) -> bool:
    return master.startswith("local")


def ship_code(spark_context: "object") -> str | None:
    """Add the ``ers_spark`` zip to a cluster application unless spark-submit already shipped one.

    Returns the zip's path when it added one, else None (local master, or ``--py-files`` had it).
    """
    conf = spark_context.getConf()  # type: ignore[attr-defined]
    master = conf.get("spark.master", "local")
    if is_local_master(master):
        return None
    submitted = [p for p in conf.get("spark.submit.pyFiles", "").split(",") if p.strip()]
    if any(Path(p).name.startswith("ers_spark") for p in submitted):
        return None
    zip_path = build_code_zip(tempfile.mkdtemp(prefix="ers-spark-code-"))
    spark_context.addPyFile(str(zip_path))  # type: ignore[attr-defined]
    log.info("shipped %s to the executors of %s (no ers_spark zip in --py-files)", zip_path, master)
    return str(zip_path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    dest = build_code_zip(args[0] if args else "dist")
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
