"""Hosts that share no disk, on this one machine: a multi-host Spark cluster and an S3 object store.

Each *host* is a Linux network namespace with its own address on a bridge this module creates,
and every process started on it runs in a mount namespace of its own where ``/tmp`` is a fresh
tmpfs and ``$HOME`` lives under it: no host sees another's ``/tmp``, home, Spark work or local
dirs, model cache or lake. The master's and the workers' hosts also hide the repository (a tmpfs
over it), so the executors import ers-spark only from the code the driver ships. What every host
still sees is the machine's installed software (Python, pyspark, Java), as an image would give it.

The object store is Versity's S3 gateway (``versitygw``, a real server people run in production)
over a folder, listening on the bridge's own address, so the test process and every host reach it
over the network. ``.ci/run`` builds and caches its binary (``go install``).

Only addresses inside the namespaces and the bridge this module creates are used. Everything is
torn down in ``finally``: processes by their pid (each in its own session), then the namespaces and
the bridge, also after a failure. Needs root (``ip netns``, ``unshare --mount``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pyspark

from ers_spark.versions import VERSITYGW_MODULE

REPO = Path(__file__).resolve().parents[1]
SPARK_HOME = Path(pyspark.__file__).resolve().parent
CACHE = Path(os.environ.get("ERS_TEST_CACHE", Path.home() / ".cache" / "ers-spark"))
VERSITYGW = CACHE / f"versitygw-{VERSITYGW_MODULE.rsplit('@', 1)[1]}" / "versitygw"
STORE_PORT = 9000
MASTER_PORT = 7077
MASTER_UI_PORT = 8080
WORKER_CORES = 2  # two task slots per worker: two applications (two drivers) run side by side
FAKE_GPUS = 2  # per worker host: the GPU resource profile of the model-fault runs (tasks get a GPU address)
GPU_DISCOVERY = REPO / "deploy" / "spark" / "gpu_discovery.sh"
ACCESS_KEY, SECRET_KEY = "ers-test", "ers-test-secret-key"
# a guard against a hang, not a speed check (2 cores run four JVMs here)
START_GUARD_S = 180.0


def wait_until(what: str, check, timeout: float = 180.0) -> None:
    """Poll ``check`` until it holds; a TimeoutError naming ``what`` after ``timeout`` seconds (a hang guard)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def missing_requirements() -> str | None:
    """Why this machine cannot run the multi-host tests, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns, unshare --mount)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"needs the {tool} command"
    if not VERSITYGW.is_file():
        return (f"the object store binary {VERSITYGW} is missing: .ci/run builds it "
                f"(GOBIN={VERSITYGW.parent} go install {VERSITYGW_MODULE})")
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _free_subnet() -> int:
    """A 10.231.N.0/24 that no interface of this machine uses yet (N in 1..250)."""
    used = _ip("-4", "-o", "addr", "show").stdout
    for n in range(1 + os.getpid() % 250, 251):
        if f" 10.231.{n}." not in used:
            return n
    raise RuntimeError("no free 10.231.N.0/24 subnet for the test hosts")


@dataclass
class Host:
    """One network namespace with one address; processes started on it get a private /tmp and $HOME."""

    name: str
    netns: str
    address: str
    hide_repo: bool
    read_only_binds: dict[str, str] = field(default_factory=dict)  # host path -> source folder

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "JAVA_HOME", "LANG", "LC_ALL", "PYENV_VERSION")}
        return {**keep, "HOME": "/tmp/home", "TMPDIR": "/tmp", "SPARK_LOCAL_IP": self.address,
                "SPARK_LOCAL_DIRS": "/tmp/spark-local", "PYSPARK_PYTHON": sys.executable,
                "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_HOME": str(SPARK_HOME),
                "SPARK_SUBMIT": str(SPARK_HOME / "bin" / "spark-submit"), **(extra or {})}

    def argv(self, command: list[str]) -> list[str]:
        """``command`` as it runs on this host: in its namespace, behind its own /tmp (and repo)."""
        # a clone under /tmp vanishes behind the host's own /tmp: hidden already where it must be, and carried
        # through it (bound to /mnt first, moved back after) where the host runs the repository's code
        repo_under_tmp = REPO.is_relative_to("/tmp")
        keep_repo = repo_under_tmp and not self.hide_repo
        setup = [f"mount --bind {REPO} /mnt"] if keep_repo else []
        setup += ["mount -t tmpfs -o size=4g ers-host-tmp /tmp", "mkdir -p /tmp/home /tmp/spark-local /tmp/work"]
        if keep_repo:
            setup += [f"mkdir -p {REPO}", f"mount --move /mnt {REPO}"]
        if self.hide_repo and not repo_under_tmp:
            setup.append(f"mount -t tmpfs -o size=1m,ro ers-no-repo {REPO}")
        for target, source in self.read_only_binds.items():
            setup += [f"mkdir -p {target}", f"mount --bind {source} {target}", f"mount -o remount,bind,ro {target}"]
        script = " && ".join(setup) + ' && exec "$@"'
        return ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private",
                "sh", "-c", script, self.name, *command]

    def run(self, command: list[str], env: dict[str, str] | None = None, timeout: float = 1800.0,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
        """Run ``command`` on this host to its end; on a hang, end it and everything it started (its session)."""
        proc = subprocess.Popen(self.argv(command), env=self.env(env), cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_session(proc, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\nmulti-host: {command[0]} killed after {timeout:.0f} s"
        return subprocess.CompletedProcess(command, proc.returncode, out, err)

    def start(self, command: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | str = "/") -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(self.argv(command), env=self.env(env), cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)


@dataclass
class MultiHostCluster:
    """A bridge, a store on the bridge's address, and hosts: master, two workers, two drivers."""

    root: Path  # this fixture's folder on the test machine (the store's data, logs); no host sees it
    shared: Path  # read-only things every host may read, as an image would give them: configs, jars, models
    bucket: str = "ers"
    subnet: int = field(default_factory=_free_subnet)
    tag: str = field(default_factory=lambda: f"e{os.getpid() % 100000}")
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    # ----------------------------------------------------------------- addresses
    def address(self, index: int) -> str:
        return f"10.231.{self.subnet}.{index}"

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def store_endpoint(self) -> str:
        return f"http://{self.address(1)}:{STORE_PORT}"

    @property
    def master_url(self) -> str:
        return f"spark://{self.hosts['master'].address}:{MASTER_PORT}"

    def s3a_conf(self) -> dict[str, str]:
        """The S3A keys a config gives Spark for this store (no key lives in the project's code)."""
        return {
            "spark.hadoop.fs.s3a.endpoint": self.store_endpoint,
            "spark.hadoop.fs.s3a.endpoint.region": "us-east-1",
            "spark.hadoop.fs.s3a.path.style.access": "true",
            "spark.hadoop.fs.s3a.connection.ssl.enabled": "false",
            "spark.hadoop.fs.s3a.aws.credentials.provider": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
            "spark.hadoop.fs.s3a.access.key": ACCESS_KEY,
            "spark.hadoop.fs.s3a.secret.key": SECRET_KEY,
        }

    def store_path(self, key: str) -> Path:
        """Where the object ``s3a://<bucket>/<key>`` lies on the store's disk (versitygw keeps plain files)."""
        return self.root / "store" / self.bucket / key

    # ----------------------------------------------------------------- network
    def _add_host(self, name: str, index: int, hide_repo: bool, read_only_binds: dict[str, str] | None = None) -> Host:
        netns, host_end, ns_end = f"{self.tag}-{name}", f"{self.tag}h{index}", f"{self.tag}n{index}"
        _ip("netns", "add", netns)
        self.namespaces.append(netns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        self.links.append(host_end)
        _ip("link", "set", ns_end, "netns", netns)
        _ip("link", "set", host_end, "master", self.bridge)
        _ip("link", "set", host_end, "up")
        address = self.address(index)
        for args in (["addr", "add", f"{address}/24", "dev", ns_end], ["link", "set", ns_end, "up"],
                     ["link", "set", "lo", "up"]):
            _ip("netns", "exec", netns, "ip", *args)
        host = Host(name, netns, address, hide_repo, read_only_binds or {})
        self.hosts[name] = host
        return host

    def _network(self, model_dir: Path) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        _ip("addr", "add", f"{self.address(1)}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self._add_host("master", 2, hide_repo=True)
        self._add_host("worker1", 3, hide_repo=True)
        self._add_host("worker2", 4, hide_repo=True)
        self._add_host("driver", 5, hide_repo=False, read_only_binds={"/tmp/models": str(model_dir)})
        self._add_host("driver2", 6, hide_repo=False, read_only_binds={"/tmp/models": str(model_dir)})

    # ----------------------------------------------------------------- processes
    def stop_store(self) -> None:
        """Stop the object store (SIGTERM, by pid): every request meets a refused connection until it is back."""
        _kill_session(self.procs.pop("store"), signal.SIGTERM)

    def store_requests(self) -> list[str]:
        """The store's request log so far, one line per request (method and path in each)."""
        return (self.root / "logs" / "store.out").read_text(errors="replace").splitlines()

    def _start_store(self) -> None:
        data = self.root / "store"
        (data / self.bucket).mkdir(parents=True, exist_ok=True)  # a folder under the root is a bucket
        with open(self.root / "logs" / "store.out", "ab") as out:
            self.procs["store"] = subprocess.Popen(
                [str(VERSITYGW), "-a", ACCESS_KEY, "-s", SECRET_KEY, "-p", f"{self.address(1)}:{STORE_PORT}",
                 "posix", str(data)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until("multi-host cluster: the object store", lambda: _answers(self.store_endpoint), START_GUARD_S)

    def _start_spark(self) -> None:
        master = self.hosts["master"]
        self.procs["master"] = master.start(
            [str(SPARK_HOME / "bin" / "spark-class"), "org.apache.spark.deploy.master.Master", "--host",
             master.address, "--port", str(MASTER_PORT), "--webui-port", str(MASTER_UI_PORT)],
            self.root / "logs" / "master.out")
        wait_until("multi-host cluster: the master", lambda: self.master_state() is not None, START_GUARD_S)
        for name in ("worker1", "worker2"):
            self.start_worker(name)
        wait_until("multi-host cluster: two workers", lambda: self.alive_workers() == 2, START_GUARD_S)

    def _fake_gpus(self) -> dict[str, str]:
        """Two fake GPUs per worker host, found by the project's discovery script (``deploy/spark/``) through a
        stub ``nvidia-smi``: both in the config map every host sees (the workers' hosts hide the repo)."""
        folder = self.shared / "gpu"
        folder.mkdir(parents=True, exist_ok=True)
        discovery = folder / "gpu_discovery.sh"
        shutil.copy2(GPU_DISCOVERY, discovery)
        stub = folder / "nvidia-smi"
        stub.write_text("#!/bin/sh\n" + "".join(f"echo {i}\n" for i in range(FAKE_GPUS)))
        stub.chmod(0o755)
        return {"PATH": f"{folder}:{os.environ['PATH']}", "SPARK_WORKER_OPTS": (
            f"-Dspark.worker.resource.gpu.amount={FAKE_GPUS} -Dspark.worker.resource.gpu.discoveryScript={discovery}")}

    def start_worker(self, name: str) -> None:
        worker = self.hosts[name]
        self.procs[name] = worker.start(
            [str(SPARK_HOME / "bin" / "spark-class"), "org.apache.spark.deploy.worker.Worker", "--host", worker.address,
             "--cores", str(WORKER_CORES), "--memory", "2g", "--work-dir", "/tmp/work", self.master_url],
            self.root / "logs" / f"{name}.out", env=self._fake_gpus())

    def host_pids(self, name: str) -> list[int]:
        """Every process of a host's service: its session (the worker, its executors, their Python workers)."""
        proc = self.procs.get(name)
        if proc is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getsid(int(entry.name)) == proc.pid:
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def embedding_on(self, name: str) -> bool:
        """Whether a Python worker on this host has ONNX Runtime loaded (an embed task runs there now)."""
        for pid in self.host_pids(name):
            try:
                if "onnxruntime_pybind11_state" in Path(f"/proc/{pid}/maps").read_text():
                    return True
            except OSError:
                continue
        return False

    def kill_host(self, name: str) -> int:
        """SIGKILL every process of a host at once, by pid (a host that loses power); returns how many."""
        pids = self.host_pids(name)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs.pop(name).wait(timeout=30)
        return len(pids)

    def master_state(self) -> dict | None:
        url = f"http://{self.hosts['master'].address}:{MASTER_UI_PORT}/json/"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return json.load(resp)
        except OSError:
            return None

    def alive_workers(self) -> int:
        return sum(1 for w in (self.master_state() or {}).get("workers", []) if w.get("state") == "ALIVE")

    # ----------------------------------------------------------------- life cycle
    def start(self, model_dir: Path) -> "MultiHostCluster":
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self._network(model_dir)
        self._start_store()
        self._start_spark()
        return self

    def start_store(self) -> None:
        """Start the store again on the same address and folder (after :meth:`stop_store`)."""
        self._start_store()

    def stop(self) -> None:
        for name in list(self.procs):
            _kill_session(self.procs.pop(name), signal.SIGTERM)
        for netns in self.namespaces:
            _ip("netns", "del", netns, check=False)
        for link in reversed(self.links):
            _ip("link", "del", link, check=False)
        self.namespaces.clear()
        self.links.clear()

    def logs(self) -> str:
        """The tail of every log, for a failure message."""
        parts = []
        for log in sorted((self.root / "logs").glob("*.out")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)


def _kill_session(proc: subprocess.Popen, sig: int) -> None:
    """End a process we started and everything in its session (Spark's Python workers, executors)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True  # an S3 error document (403 for an anonymous request) is an answer
    except OSError:
        return False
    return True
