"""A real, private, token-authenticated Ray head for the cluster tests.

``RayHead.start()`` runs ``ray start --head --block`` from the project's venv,
asked for 127.0.0.1 on free ports (Ray 2.60 still listens on every interface for its GCS,
raylet and some agents: the README's Tests section lists what listens where), with its own ``--temp-dir`` and
``RAY_AUTH_MODE=token`` + a fresh ``RAY_AUTH_TOKEN``.  Every client command the
tests run (``ray job submit``, ``ray job logs``) gets the same auth variables
through :attr:`RayHead.env`; they are never put into this process's
``os.environ``, so other tests' ``ray.init()`` calls in the same pytest session
keep running without token auth and no ``~/.ray/auth_token`` is ever written.

``RayHead.stop()`` ends exactly the processes this head started, by pid: the
``ray start --block`` process (which tears down its GCS, raylet, dashboard and
their workers on SIGTERM), then any of its descendants still alive.  It never
runs ``ray stop``, which kills every Ray process of every user on the machine
(other engineers' and CI jobs' clusters included).

Several nodes on one machine: :meth:`RayHead.add_node` starts a worker node (its
own ``ray start --block --address ...`` process) that joins this head with the
same token.  Each node, the head included, gets its own node-manager, object-manager,
dashboard-agent, runtime-env-agent and metrics ports, a disjoint worker port range,
and (worker nodes) its own ``--temp-dir``: with a shared temp dir a worker node's
runtime-env agent garbage-collects the job's unpacked working dir under the running
driver.  Nodes are started one at a time (two raylets starting together can race for
a port); :meth:`RayNode.kill_raylet` SIGKILLs one node's raylet by pid, which is how
the tests lose a node.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent
_TAKEN_RANGES: list[range] = []  # worker port ranges handed out by this process (kept disjoint)


class _StartExited(RuntimeError):
    """``ray start`` ended before its node came up (typically a port that was free when picked)."""


def _retry_start(start_once, attempts: int, before_retry=lambda: None):
    """``start_once()``, again (after ``before_retry()``) while it raises :class:`_StartExited`, up to ``attempts`` tries."""
    for attempt in range(1, attempts + 1):
        try:
            return start_once()
        except _StartExited:
            if attempt == attempts:
                raise
            before_retry()
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_range(size: int = 100) -> range:
    """``size`` consecutive ports, free now and disjoint from every range handed out before."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - size)
        r = range(base, base + size)
        if any(r.start < t.stop and t.start < r.stop for t in _TAKEN_RANGES):
            continue
        if all(_port_is_free(p) for p in r):
            _TAKEN_RANGES.append(r)
            return r
    raise RuntimeError(f"no {size} consecutive free ports found")


def node_port_args() -> list[str]:
    """Every per-node port of ``ray start`` set to a free one, plus a private worker port range."""
    workers = free_port_range()
    return [
        "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()),
        # Every port Ray would otherwise take at a fixed default (agent 52365, client 10001)
        # is a free one, so this node coexists with other Ray instances on the machine.
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--min-worker-port", str(workers.start),
        "--max-worker-port", str(workers.stop - 1),
    ]


def _session_members(sid: int) -> list[psutil.Process]:
    """Processes in session ``sid`` (each node's ``ray start`` runs in a session of its own,
    so this finds its processes even after they were re-parented when the raylet died)."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.pid != os.getpid():
                found.append(p)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return found


def _stop_tree(proc: subprocess.Popen | None, grace_s: float) -> None:
    """SIGTERM a ``ray start --block`` process (it tears down what it started), then kill
    what is left of its tree and of its session."""
    if proc is None:
        return
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=5)
    alive = {p.pid: p for p in [*alive, *_session_members(proc.pid)]}.values()
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(alive), timeout=5)


class RayHead:
    """One local Ray head node; use :meth:`start` / :meth:`stop` (or as a context manager)."""

    def __init__(self, num_cpus: int = 2) -> None:
        self.num_cpus = num_cpus
        self._pick_ports()
        self.token = secrets.token_hex(32)
        # Short path: Ray's unix socket paths must stay under ~107 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dprt", dir="/tmp"))
        self.log_path = self.temp_dir / "ray-start.log"
        self._proc: subprocess.Popen | None = None
        self.node_id: str | None = None
        self.nodes: list[RayNode] = []
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            # The GCS declares a node dead after `failure_threshold` failed health checks `period_ms`
            # apart (defaults 5 x 3 s): a SIGKILLed raylet refuses the check at once, so a 1 s period
            # finds it in ~5 s instead of ~15 s; a live but busy raylet still has 5 x 10 s to answer.
            RAY_health_check_period_ms="1000",
            # The job entrypoint's `python` and the workers' interpreter are the venv's.
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.env = env

    # ------------------------------------------------------------------ lifecycle
    def _pick_ports(self) -> None:
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"

    def start(self, timeout_s: float = 180.0, attempts: int = 3) -> "RayHead":
        """Start the head; a ``ray start`` that exits at once (a port chosen free was taken before
        Ray bound it: the ports are picked, released, then handed to Ray) is retried on new ports."""
        return _retry_start(lambda: self._start_once(timeout_s), attempts, before_retry=self._pick_ports)

    def _start_once(self, timeout_s: float) -> "RayHead":
        cmd = [
            str(VENV_BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1",
            "--port", str(self.gcs_port),
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(free_port()),
            *node_port_args(),
            "--num-cpus", str(self.num_cpus),
            "--num-gpus", "0",
            "--include-dashboard", "true",
            "--temp-dir", str(self.temp_dir),
            "--disable-usage-stats",
        ]
        log = open(self.log_path, "wb")
        self._proc = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                proc, self._proc = self._proc, None
                _stop_tree(proc, 5.0)
                raise _StartExited(f"ray start exited with {proc.returncode}:\n{self.start_log()}")
            try:
                self.api("/api/version")
                alive = self.alive_node_ids()
                if len(alive) == 1:
                    self.node_id = next(iter(alive))
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"Ray head did not answer on {self.address} within {timeout_s:.0f}s:\n{self.start_log()}")

    def stop(self, grace_s: float = 3.0) -> None:
        """Stop the worker nodes (newest first), then the head; everything by pid.

        After jobs ran, the head's ``ray start --block`` often does not finish its own
        teardown within 30 s of SIGTERM; after ``grace_s`` what is left is killed (the
        cluster's state dies with it: nothing of it is kept).
        """
        for node in reversed(self.nodes):
            node.stop()
        self.nodes = []
        proc, self._proc = self._proc, None
        _stop_tree(proc, grace_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ worker nodes
    def add_node(self, num_cpus: int, timeout_s: float = 120.0) -> "RayNode":
        """Start one worker node and wait until the head counts it alive (one node at a time)."""
        node = RayNode(self, num_cpus)
        self.nodes.append(node)
        node.start(timeout_s)
        return node

    def ensure_nodes(self, count: int, num_cpus: int) -> list["RayNode"]:
        """Forget dead worker nodes (stopping what is left of them), start new ones up to ``count`` alive."""
        for node in [n for n in self.nodes if not n.alive()]:
            node.stop()
            self.nodes.remove(node)
        while len(self.nodes) < count:
            self.add_node(num_cpus)
        self.wait_for_free_cpus(num_cpus)
        return list(self.nodes)

    def wait_for_free_cpus(self, num_cpus: int, timeout_s: float = 120.0) -> None:
        """Until the head's resource view shows every worker node with ``num_cpus`` CPUs, none in use.

        A node the GCS already counts alive reaches the resource view some seconds later (~4 s
        measured), and a finished job's workers release their CPUs asynchronously: a job submitted
        before then is placed on fewer CPUs than the test started (an elastic group starts small).
        """
        deadline = time.monotonic() + timeout_s
        want = {n.node_id: [0.0, float(num_cpus)] for n in self.nodes}
        seen: dict = {}
        while time.monotonic() < deadline:
            try:
                report = self.api("/api/cluster_status")["data"]["clusterStatus"]["loadMetricsReport"]
                seen = {k: v.get("CPU") for k, v in (report.get("usageByNode") or {}).items()}
                if all(seen.get(node_id) == cpus for node_id, cpus in want.items()):
                    return
            except (urllib.error.URLError, ConnectionError, OSError, KeyError, TypeError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {len(want)} node(s) with {num_cpus} free "
                           f"CPUs each; CPU [used, total] by node: {seen}")

    def alive_node_ids(self) -> set[str]:
        """Node ids the head's GCS reports ALIVE (Ray's state API through the dashboard)."""
        data = self.api("/api/v0/nodes?limit=1000")
        rows = data["data"]["result"]["result"]
        return {r["node_id"] for r in rows if r.get("state") == "ALIVE"}

    def wait_for_nodes(self, predicate, what: str, timeout_s: float = 120.0) -> set[str]:
        """Poll :meth:`alive_node_ids` until ``predicate(ids)`` holds."""
        deadline = time.monotonic() + timeout_s
        ids: set[str] = set()
        while time.monotonic() < deadline:
            try:
                ids = self.alive_node_ids()
                if predicate(ids):
                    return ids
            except (urllib.error.URLError, ConnectionError, OSError, KeyError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}; alive nodes: {sorted(ids)}")

    # ------------------------------------------------------------------ clients
    def start_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "<no log>"

    def api(self, path: str, token: str | None = "default") -> dict:
        """GET the jobs REST API (JSON), with the head's token unless told otherwise."""
        req = urllib.request.Request(self.address + path)
        tok = self.token if token == "default" else token
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read().decode())

    def job_info(self, submission_id: str) -> dict:
        return self.api(f"/api/jobs/{submission_id}")

    def ray_cli(self, *args: str, cwd: str | Path | None = None, timeout: float = 120.0,
                env: dict | None = None) -> subprocess.CompletedProcess:
        """Run the real ``ray`` CLI from the venv against this head."""
        return subprocess.run(
            [str(VENV_BIN / "ray"), *args], env=env or self.env, cwd=cwd,
            capture_output=True, text=True, timeout=timeout,
        )

    def submit(self, submission_id: str, entrypoint: list[str], runtime_env: dict,
               cwd: str | Path, timeout: float = 600.0, wait: bool = True) -> subprocess.CompletedProcess:
        """``ray job submit`` and follow the logs until the job ends (exit 1 when it FAILED).

        ``wait=False`` submits with ``--no-wait`` and returns once the job is accepted.
        Right after start the dashboard answers before the head's job agent has registered
        and refuses submissions with "No available agent to submit job, please try again
        later"; that refusal (no job was created) is retried for up to a minute.
        """
        deadline = time.monotonic() + 60
        while True:
            proc = self.ray_cli(
                "job", "submit", "--address", self.address,
                "--submission-id", submission_id,
                "--runtime-env-json", json.dumps(runtime_env),
                *([] if wait else ["--no-wait"]),
                "--", *entrypoint,
                cwd=cwd, timeout=timeout,
            )
            if "No available agent to submit job" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
                return proc
            time.sleep(2.0)

    def wait_for_job(self, submission_id: str, timeout_s: float = 600.0) -> dict:
        """Poll the job until it reaches a terminal status; returns its info."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job_info(submission_id)
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {submission_id} still {info['status']} after {timeout_s:.0f}s")
            time.sleep(2.0)

    def stop_job(self, submission_id: str) -> None:
        self.ray_cli("job", "stop", "--address", self.address, submission_id)

    def logs(self, submission_id: str) -> str:
        proc = self.ray_cli("job", "logs", "--address", self.address, submission_id)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout


class RayNode:
    """One worker node of a :class:`RayHead`: its own ``ray start --block`` process, ports and temp dir."""

    def __init__(self, head: RayHead, num_cpus: int) -> None:
        self.head = head
        self.num_cpus = num_cpus
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dprn", dir="/tmp"))
        self.log_path = self.temp_dir / "ray-start.log"
        self.node_id: str | None = None
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0, attempts: int = 3) -> "RayNode":
        """Start the node; one whose ``ray start`` exits at once (a port taken meanwhile) is retried on new ports."""
        return _retry_start(lambda: self._start_once(timeout_s), attempts)

    def _start_once(self, timeout_s: float) -> "RayNode":
        before = self.head.alive_node_ids()
        cmd = [
            str(VENV_BIN / "ray"), "start", "--block",
            "--address", self.head.gcs_address,
            "--node-ip-address", "127.0.0.1",
            *node_port_args(),
            "--num-cpus", str(self.num_cpus),
            "--num-gpus", "0",
            "--temp-dir", str(self.temp_dir),
            "--disable-usage-stats",
        ]
        log = open(self.log_path, "wb")
        self._proc = subprocess.Popen(cmd, env=self.head.env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        log.close()
        try:
            ids = self.head.wait_for_nodes(lambda ids: len(ids - before) >= 1 or self._proc.poll() is not None,
                                           "a new worker node", timeout_s)
        except RuntimeError:
            self.stop()
            raise
        if self._proc.poll() is not None:
            proc, self._proc = self._proc, None
            _stop_tree(proc, 5.0)
            raise _StartExited(f"worker node exited with {proc.returncode}:\n{self.start_log()}")
        self.node_id = next(iter(ids - before))
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def raylet(self) -> psutil.Process:
        """This node's raylet process (a descendant of its ``ray start`` process)."""
        for p in psutil.Process(self._proc.pid).children(recursive=True):
            try:
                if p.name() == "raylet" or "/raylet" in " ".join(p.cmdline()[:1]):
                    return p
            except psutil.NoSuchProcess:
                continue
        raise RuntimeError(f"no raylet under ray start pid {self._proc.pid}")

    def descendant_pids(self) -> set[int]:
        try:
            return {p.pid for p in psutil.Process(self._proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def kill_raylet(self) -> int:
        """SIGKILL this node's raylet (the node is lost); returns its pid."""
        p = self.raylet()
        os.kill(p.pid, signal.SIGKILL)
        return p.pid

    def alive(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            return False
        try:
            return self.raylet().is_running()
        except (RuntimeError, psutil.NoSuchProcess):
            return False

    def stop(self, grace_s: float = 3.0) -> None:
        proc, self._proc = self._proc, None
        _stop_tree(proc, grace_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def start_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "<no log>"
