"""Each version pin has one home, ers_spark/versions.py: what repeats it elsewhere must agree with it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from ers_spark.config import load_config, pinned_packages
from ers_spark.errors import ConfigError
from ers_spark.versions import AWS_SDK_S3_PACKAGES, DELTA_PACKAGE, GRAPHFRAMES_PACKAGE, HADOOP_AWS_PACKAGE, PACKAGES

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _version(coordinate: str) -> str:
    return coordinate.rsplit(":", 1)[1]


def _requirements() -> dict[str, Requirement]:
    """pyproject.toml's dependencies and extras, by package name."""
    text = (REPO / "pyproject.toml").read_text()  # (no tomllib: Python 3.10 is supported)
    listed = re.findall(r'"([A-Za-z][A-Za-z0-9_.\-]*\s*(?:==|>=|<=|~=|!=|<|>)[^"]*)"', text)
    return {r.name: r for r in map(Requirement, listed)}


@pytest.mark.parametrize("pattern, pin", [
    (r"io\.delta:delta-spark[^\s`:]*:[^\s`]+", DELTA_PACKAGE),
    (r"io\.graphframes:graphframes[^\s`:]*:[^\s`]+", GRAPHFRAMES_PACKAGE),
])
def test_readme_coordinates_are_the_pinned_ones(pattern: str, pin: str) -> None:
    found = re.findall(pattern, README)
    assert found, f"README names no {pin.split(':')[0]} coordinate"
    assert set(found) == {pin}, f"README has {sorted(set(found))}, ers_spark/versions.py pins {pin}"


def test_readme_graphframes_jar_and_python_package_are_the_pinned_version() -> None:
    version = _version(GRAPHFRAMES_PACKAGE)
    assert set(re.findall(r"graphframes-py==([\w.]+)", README)) == {version}
    assert set(re.findall(r"graphframes-spark4_2\.13-([\w.]+?)\.jar", README)) == {version}


def test_airflow_dag_default_is_the_pinned_delta() -> None:
    """The DAG runs where ers-spark may not be installed, so it writes the coordinate out; it must be this one."""
    tree = ast.parse((REPO / "deploy" / "airflow" / "ers_spark_dag.py").read_text())
    defaults = [
        node.value.args[1].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DELTA_PACKAGES" for t in node.targets)
    ]
    assert defaults == [DELTA_PACKAGE]


def test_pyproject_python_packages_match_the_jars() -> None:
    reqs = _requirements()
    delta_version = _version(DELTA_PACKAGE)
    assert reqs["delta-spark"].specifier.contains(delta_version), (reqs["delta-spark"], DELTA_PACKAGE)
    (pyspark_pin,) = [s.version for s in reqs["pyspark"].specifier if s.operator == "=="]
    spark_minor = ".".join(pyspark_pin.split(".")[:2])
    assert f"delta-spark_{spark_minor}_2.13:" in DELTA_PACKAGE, (pyspark_pin, DELTA_PACKAGE)
    assert reqs["graphframes-py"].specifier.contains(_version(GRAPHFRAMES_PACKAGE))
    airflow = (REPO / "deploy" / "airflow" / "requirements.txt").read_text()
    assert re.findall(r"^pyspark-client==(\S+)", airflow, flags=re.M) == [pyspark_pin]


@pytest.mark.parametrize("name", ["local.yaml", "cluster.example.yaml"])
def test_shipped_configs_name_the_pins_instead_of_writing_them(name: str) -> None:
    path = REPO / "ers_spark" / "conf" / name
    raw = yaml.safe_load(path.read_text())
    assert raw["spark"]["packages"] == ["delta"]
    assert load_config(path).spark.packages == [DELTA_PACKAGE]


def test_object_store_example_names_the_s3a_pins() -> None:
    path = REPO / "ers_spark" / "conf" / "object-store.example.yaml"
    assert yaml.safe_load(path.read_text())["spark"]["packages"] == ["delta", "s3a"]
    assert load_config(path).spark.packages == [DELTA_PACKAGE, HADOOP_AWS_PACKAGE, *AWS_SDK_S3_PACKAGES]


def test_s3a_is_the_hadoop_pyspark_bundles() -> None:
    """hadoop-aws must be the version of the Hadoop client jars inside pyspark (one Hadoop on the classpath)."""
    import pyspark

    bundled = {p.name for p in (Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar")}
    assert bundled == {f"hadoop-client-api-{_version(HADOOP_AWS_PACKAGE)}.jar"}


def test_pinned_packages_names_and_coordinates() -> None:
    assert pinned_packages(["delta", "graphframes"], "x.yaml") == [PACKAGES["delta"], PACKAGES["graphframes"]]
    assert pinned_packages(["org.example:extra_2.13:1.0"], "x.yaml") == ["org.example:extra_2.13:1.0"]
    with pytest.raises(ConfigError, match=r"^spark\.packages: unknown package 'detla' \(in x\.yaml\); name one of delta, "):
        pinned_packages(["detla"], "x.yaml")


def test_overrides_may_name_a_pin() -> None:
    cfg = load_config(overrides=["spark.packages=[delta, graphframes]"])
    assert cfg.spark.packages == [DELTA_PACKAGE, GRAPHFRAMES_PACKAGE]
    assert cfg.with_overrides(["embed.batch_size=8"]).spark.packages == cfg.spark.packages
