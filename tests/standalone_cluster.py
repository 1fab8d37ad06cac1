"""A real Spark standalone cluster for tests: one master and two workers as separate JVM processes.

Started from the pip-installed pyspark's ``bin/spark-class`` (it has no ``start-master.sh``). Each
worker has one core, its own work dir and two *fake* GPUs: the project's own discovery script
(``deploy/spark/gpu_discovery.sh``) runs against a stub ``nvidia-smi``, so GPU scheduling and
device mapping run for real on a CPU-only machine. Jobs go through ``deploy/ers-submit``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pyspark

REPO = Path(__file__).resolve().parents[1]
SPARK_HOME = Path(pyspark.__file__).resolve().parent
ERS_SUBMIT = REPO / "deploy" / "ers-submit"
GPU_DISCOVERY = REPO / "deploy" / "spark" / "gpu_discovery.sh"
FAKE_GPUS = 2
# Task slots per worker: the one test application has one one-core executor on each worker.
WORKER_CORES = 1
# The cluster's JVMs (master, workers, the test applications' drivers and executors) live minutes and run
# little hot code: the C1 compiler alone spends far less CPU than C1 + C2 on a 2-core machine that the
# other test worker shares. A setting of this test rig, not of ers-spark.
SHORT_LIVED_JVM = "-XX:TieredStopAtLevel=1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# How long one spark-submit may run before the test calls it hung. A guard against hangs, not a speed
# check: CI's 2-core machine, with the other xdist worker busy, once needed more than 9 minutes for the
# job batch of tests/test_cluster.py (12 job runs in one JVM) that takes under 3 minutes on a quiet machine.
SUBMIT_HANG_GUARD_S = 1800.0


def wait_until(what: str, check, timeout: float = 180.0) -> None:
    """Poll ``check`` until it holds; a TimeoutError naming ``what`` after ``timeout`` seconds (a hang guard)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


@dataclass
class SubmitResult:
    returncode: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict]:
        """The stage records (one JSON line each) the job printed."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith('{"')]

    def error_lines(self) -> list[str]:
        return [line for line in (self.stdout + self.stderr).splitlines() if line.startswith("error: ")]

    def failure(self) -> str:
        """What a failed submit said, without Spark's INFO lines: stdout's tail and stderr's other lines."""
        return failure_text(self.stdout, self.stderr)


def failure_text(stdout: str, stderr: str) -> str:
    spark_info = re.compile(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d (INFO|DEBUG) ")
    other = [line for line in stderr.splitlines() if not spark_info.match(line)]
    return "stdout:\n" + stdout[-2000:] + "\nstderr without INFO lines:\n" + "\n".join(other)[-6000:]


@dataclass
class StandaloneCluster:
    root: Path
    master_port: int = field(default_factory=free_port)
    master_ui_port: int = field(default_factory=free_port)
    worker_procs: list[subprocess.Popen | None] = field(default_factory=list)
    master_proc: subprocess.Popen | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.master_port}"

    def work_dir(self, i: int) -> Path:
        return self.root / f"worker{i}" / "work"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOG_DIR=str(self.root / "logs"), SPARK_PID_DIR=str(self.root),
                   SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, SPARK_DAEMON_JAVA_OPTS=SHORT_LIVED_JVM)
        env.update(self.extra_env)
        env.pop("PYSPARK_GATEWAY_PORT", None)
        env.pop("PYSPARK_GATEWAY_SECRET", None)
        return env

    def _fake_nvidia_smi(self) -> Path:
        folder = self.root / "fakebin"
        folder.mkdir(parents=True, exist_ok=True)
        stub = folder / "nvidia-smi"
        stub.write_text("#!/bin/sh\n" + "".join(f"echo {i}\n" for i in range(FAKE_GPUS)))
        stub.chmod(0o755)
        return folder

    def start(self) -> "StandaloneCluster":
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "StandaloneCluster":
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        log = open(self.root / "logs" / "master.out", "ab")
        self.master_proc = subprocess.Popen(
            [str(SPARK_HOME / "bin" / "spark-class"), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(self.master_port), "--webui-port", str(self.master_ui_port)],
            env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_until("standalone cluster: master", lambda: self.master_state() is not None)
        for i in range(2):
            self.worker_procs.append(None)
            self.start_worker(i)
        wait_until("standalone cluster: two workers", lambda: self.alive_workers() == 2)
        return self

    def start_worker(self, i: int) -> None:
        env = self._env()
        env["PATH"] = f"{self._fake_nvidia_smi()}:{env['PATH']}"
        env["SPARK_WORKER_OPTS"] = (
            f"-Dspark.worker.resource.gpu.amount={FAKE_GPUS} -Dspark.worker.resource.gpu.discoveryScript={GPU_DISCOVERY}"
        )
        self.work_dir(i).mkdir(parents=True, exist_ok=True)
        log = open(self.root / "logs" / f"worker{i}.out", "ab")
        self.worker_procs[i] = subprocess.Popen(
            [str(SPARK_HOME / "bin" / "spark-class"), "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
             "--cores", str(WORKER_CORES), "--memory", "3g", "--work-dir", str(self.work_dir(i)), "--webui-port", str(free_port()),
             self.url],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def master_state(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.master_ui_port}/json/", timeout=2) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):  # not listening yet, or its UI still starting (serves HTML)
            return None

    def alive_workers(self) -> int:
        state = self.master_state() or {}
        return sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE")

    def submit_args(self, job: str, *overrides: str, conf: dict[str, str] | None = None,
                    master: str | None = None) -> list[str]:
        """``deploy/ers-submit`` arguments for ``jobs/<job>.py`` (or a script path given as ``job``)."""
        args = [str(ERS_SUBMIT), "--master", master or self.url, "--deploy-mode", "client"]
        settings = {"spark.executor.memory": "1g", "spark.ui.enabled": "false", "spark.driver.extraJavaOptions": SHORT_LIVED_JVM,
                    "spark.executor.extraJavaOptions": SHORT_LIVED_JVM, **(conf or {})}
        for key, value in settings.items():
            args += ["--conf", f"{key}={value}"]
        script = job if job.endswith(".py") else str(REPO / "jobs" / f"{job}.py")
        return [*args, script, *overrides]

    def submit(self, job: str, *overrides: str, conf: dict[str, str] | None = None, master: str | None = None,
               env: dict[str, str] | None = None, timeout: float = SUBMIT_HANG_GUARD_S) -> SubmitResult:
        """spark-submit ``jobs/<job>.py`` (client mode: Python apps cannot use cluster mode on standalone)."""
        proc = subprocess.run(
            self.submit_args(job, *overrides, conf=conf, master=master), cwd=self.root, env={**self._env(), **(env or {})},
            capture_output=True, text=True, timeout=timeout,
        )
        return SubmitResult(proc.returncode, proc.stdout, proc.stderr)

    def launch(self, job: str, *overrides: str, conf: dict[str, str] | None = None,
              env: dict[str, str] | None = None) -> "RunningSubmit":
        """Start ``jobs/<job>.py`` (or a script path) under spark-submit without waiting for it."""
        proc = subprocess.Popen(self.submit_args(job, *overrides, conf=conf), cwd=self.root,
                                env={**self._env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        return RunningSubmit(proc)

    def start_batch(self, steps: list[dict], **kwargs) -> "RunningSubmit":
        """Start one spark-submit of ``tests/job_batch.py`` running ``steps`` in one JVM (see that script)."""
        return self.launch(str(Path(__file__).with_name("job_batch.py")), json.dumps(steps), **kwargs)

    def stop(self) -> None:
        for proc in [*self.worker_procs, self.master_proc]:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.worker_procs, self.master_proc]:
            if proc is not None:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


def job_step(job: str, *args: str, conf: dict[str, str] | None = None) -> dict:
    """A step of ``tests/job_batch.py`` that runs ``jobs/<job>.py`` with ``args``."""
    step: dict = {"script": str(REPO / "jobs" / f"{job}.py"), "args": list(args)}
    return {**step, "conf": conf} if conf else step


class RunningSubmit:
    """A spark-submit that runs in the background; its output is read as it comes (no pipe fills up).

    ``on_line`` callbacks see each stdout line as it arrives (the batch's ``BATCH`` lines tell which
    step has ended); :meth:`wait` returns the :class:`SubmitResult` and the batch's step results.
    """

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self.steps_done = threading.Semaphore(0)
        self._readers = [threading.Thread(target=self._read, args=(proc.stdout, self._stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(proc.stderr, self._stderr, False), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, lines: list[str], is_stdout: bool) -> None:
        for line in stream:
            lines.append(line)
            if is_stdout and line.startswith("BATCH "):
                self.steps_done.release()

    def wait(self, timeout: float = SUBMIT_HANG_GUARD_S) -> tuple[SubmitResult, list[dict]]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the driver JVM and its Python
            self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=30)
        stdout, stderr = "".join(self._stdout), "".join(self._stderr)
        steps = [json.loads(line[len("BATCH "):]) for line in stdout.splitlines() if line.startswith("BATCH ")]
        return SubmitResult(self.proc.returncode, stdout, stderr), steps

