"""The layout's import rules hold: core/ is pure math in small modules, report/ draws without Spark, lake/,
runtime/ and distributed/ never reach up to stages/, and stages/ stay thin."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import ers_spark

PACKAGE_DIR = Path(ers_spark.__file__).parent


def _modules(subpackage: str) -> list[str]:
    folder = PACKAGE_DIR / subpackage
    return [f"ers_spark.{subpackage}.{m.name}" for m in pkgutil.iter_modules([str(folder)])]


def _project_imports(module_file: Path) -> set[str]:
    tree = ast.parse(module_file.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ers_spark"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("ers_spark"))
    return names


# Blocks every pyspark import, then imports each module of core/ (and delta's Python package too).
_NO_PYSPARK = """
import importlib, sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "pyspark" or name.startswith("pyspark.") or name == "delta" or name.startswith("delta."):
            raise ImportError(f"{name} is blocked: core/ must not import Spark")
        return None
sys.meta_path.insert(0, _Block())
for name in sys.argv[1:]:
    importlib.import_module(name)
"""


CORE_MODULES = {
    "ers_spark.core.ers", "ers_spark.core.calibration", "ers_spark.core.pairs", "ers_spark.core.metrics",
    "ers_spark.core.clustering", "ers_spark.core.subcentres", "ers_spark.core.linkage", "ers_spark.core.ui_cluster",
    "ers_spark.core.cells", "ers_spark.core.projection", "ers_spark.core.synthetic",
}
MAX_CORE_LINES = 500


def test_core_imports_without_pyspark() -> None:
    modules = _modules("core")
    assert CORE_MODULES <= set(modules)
    result = subprocess.run([sys.executable, "-c", _NO_PYSPARK, *modules], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_core_modules_are_under_500_lines() -> None:
    """core/ holds one idea per module: every module of core/ stays under 500 lines."""
    too_long = {f.name: n for f in sorted((PACKAGE_DIR / "core").glob("*.py"))
                if (n := len(f.read_text().splitlines())) >= MAX_CORE_LINES}
    assert not too_long, f"core/ modules of {MAX_CORE_LINES} lines or more: {too_long}"


def test_report_renders_without_pyspark() -> None:
    """report/ draws the page from plain values: it imports (matplotlib, jinja2, PIL) with pyspark unimportable."""
    modules = _modules("report")
    assert {"ers_spark.report.content", "ers_spark.report.plots", "ers_spark.report.render"} <= set(modules)
    result = subprocess.run([sys.executable, "-c", _NO_PYSPARK, *modules], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_blocker_catches_a_pyspark_import(tmp_path: Path) -> None:
    """The check above fails when a module imports pyspark (so it cannot pass by accident)."""
    (tmp_path / "uses_spark.py").write_text("import pyspark.sql\n")
    result = subprocess.run(
        [sys.executable, "-c", _NO_PYSPARK, "uses_spark"], capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0 and "core/ must not import Spark" in result.stderr


@pytest.mark.parametrize(
    ("subpackage", "allowed"),
    [
        ("core", ("ers_spark.errors", "ers_spark.core")),
        ("lake", ("ers_spark.errors", "ers_spark.config", "ers_spark.lake")),
        ("runtime", ("ers_spark.errors", "ers_spark.config", "ers_spark.versions", "ers_spark.runtime")),
        ("models", ("ers_spark.errors", "ers_spark.models")),
        ("report", ("ers_spark.errors", "ers_spark.core", "ers_spark.report")),
        ("distributed", ("ers_spark.errors", "ers_spark.config", "ers_spark.core", "ers_spark.lake", "ers_spark.models",
                  "ers_spark.distributed")),
        ("stages", ("ers_spark.errors", "ers_spark.config", "ers_spark.core", "ers_spark.distributed", "ers_spark.lake",
                    "ers_spark.runtime", "ers_spark.models", "ers_spark.report", "ers_spark.stages")),
    ],
)
def test_imports_point_down(subpackage: str, allowed: tuple[str, ...]) -> None:
    for module_file in sorted((PACKAGE_DIR / subpackage).glob("*.py")):
        bad = {m for m in _project_imports(module_file) if not any(m == a or m.startswith(a + ".") for a in allowed)}
        assert not bad, f"{module_file.relative_to(PACKAGE_DIR)} imports {sorted(bad)}"


MAX_STAGE_LINES = 400


def test_stages_are_thin() -> None:
    """A stage reads its input, checks its contract, calls core/ and distributed/, writes and returns its run record:
    every module of stages/ stays under 400 lines (the Spark algorithms live in distributed/)."""
    too_long = {f.name: n for f in sorted((PACKAGE_DIR / "stages").glob("*.py"))
                if (n := len(f.read_text().splitlines())) >= MAX_STAGE_LINES}
    assert not too_long, f"stages/ modules of {MAX_STAGE_LINES} lines or more: {too_long}"


MAX_BODY_LINES = 40


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the one after the docstring (or the first statement) to the function's last line.

    Nested functions and classes are inside that span, so they count toward the enclosing function.
    """
    first = node.body[0]
    has_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
        first.value.value, str
    )
    start = first.end_lineno + 1 if has_docstring else first.lineno  # type: ignore[operator]
    return node.end_lineno - start + 1  # type: ignore[operator]


def test_no_function_body_over_40_lines() -> None:
    """Long functions are split into steps (plan / compute / write) that read one at a time."""
    too_long = []
    for module_file in sorted(PACKAGE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(module_file.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > MAX_BODY_LINES:
                name = module_file.relative_to(PACKAGE_DIR.parent)
                too_long.append(f"{name}:{node.name} ({_body_lines(node)} lines)")
    assert not too_long, f"function bodies over {MAX_BODY_LINES} lines: " + ", ".join(too_long)
