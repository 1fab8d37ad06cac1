"""Where a benchmark's figures come from: one run of one commit, started at one time.

Every script under ``bench/`` writes these keys into its JSON, so each figure README quotes can be
traced to the run and the code that made it (no file mixes runs: the scripts never merge old results).
"""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# the script imports this module as it starts: the run began then, whenever its result is written
STARTED = datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


# the code the run runs: read as the script starts too (a commit made while it runs is not its code)
COMMIT = _git("rev-parse", "HEAD") or None
TREE_DIRTY = bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"))


def run_provenance() -> dict[str, Any]:
    """``commit`` (HEAD), ``tree_dirty`` (tracked files changed since it, other
    than the results the scripts write) and ``run_started`` (UTC, ISO 8601), all as
    the script started."""
    return {"commit": COMMIT, "tree_dirty": TREE_DIRTY, "run_started": STARTED}


def write_result(out: str | Path, result: dict[str, Any]) -> None:
    """Write one run's ``result`` as JSON to ``out`` (the machine's cores and Python added) and print it."""
    import json
    import os
    import platform

    result = {**result, "cores": os.cpu_count(), "python": platform.python_version()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))
