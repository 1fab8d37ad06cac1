"""Commit one Delta log file three times through ers-spark's S3 LogStore, against a real store.

Run as a step of tests/job_batch.py on a driver that has the LogStore's jar: the first create wins;
a second create of the same version with other bytes (another driver's commit) is refused with
java.nio.file.FileAlreadyExistsException, which Delta answers by retrying at the next version; the
same bytes again (S3A retrying a PUT whose first attempt had landed) pass. Prints one JSON line.

    logstore_probe.py s3a://bucket/some/table
"""

from __future__ import annotations

import json
import sys

from pyspark.sql import SparkSession


def main(table: str) -> None:
    spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
    jvm, conf = spark._jvm, spark._jsc.hadoopConfiguration()
    store = jvm.io.ersspark.delta.S3ConditionalLogStore(conf)
    path = jvm.org.apache.hadoop.fs.Path(f"{table.rstrip('/')}/_delta_log/00000000000000000000.json")

    def commit(lines: list[str]) -> str:
        actions = jvm.java.util.ArrayList()
        for line in lines:
            actions.add(line)
        try:
            store.write(path, actions.iterator(), False, conf)
        except Exception as exc:  # noqa: BLE001 - the Java exception's class is the result
            java = getattr(exc, "java_exception", None)
            return java.getClass().getName() if java is not None else type(exc).__name__
        return "written"

    ours, theirs = ['{"commitInfo":{"txnId":"ours"}}'], ['{"commitInfo":{"txnId":"theirs"}}']
    result = {"first": commit(ours), "other_bytes": commit(theirs), "same_bytes_again": commit(ours)}
    stream = path.getFileSystem(conf).open(path)
    try:
        result["kept"] = jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8").strip()
    finally:
        stream.close()
    print(json.dumps({"stage": "logstore-probe", **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
