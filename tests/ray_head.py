"""A real, private, token-authenticated Ray head for the cluster tests.

``RayHead.start()`` runs ``ray start --head --block`` from the project's venv,
bound to 127.0.0.1 on free ports, with its own ``--temp-dir`` and
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
"""
from __future__ import annotations

import json
import os
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """One local Ray head node; use :meth:`start` / :meth:`stop` (or as a context manager)."""

    def __init__(self, num_cpus: int = 4) -> None:
        self.num_cpus = num_cpus
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.token = secrets.token_hex(32)
        # Short path: Ray's unix socket paths must stay under ~107 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dprt", dir="/tmp"))
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log_path = self.temp_dir / "ray-start.log"
        self._proc: subprocess.Popen | None = None
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            # The job entrypoint's `python` and the workers' interpreter are the venv's.
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.env = env

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 180.0) -> "RayHead":
        cmd = [
            str(VENV_BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1",
            "--port", str(self.gcs_port),
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port),
            # Every port Ray would otherwise take at a fixed default (agent 52365, client 10001)
            # is a free one, so this head coexists with other Ray instances on the machine.
            "--dashboard-agent-listen-port", str(free_port()),
            "--ray-client-server-port", str(free_port()),
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
                raise RuntimeError(f"ray start exited with {self._proc.returncode}:\n{self.start_log()}")
            try:
                self.api("/api/version")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"Ray head did not answer on {self.address} within {timeout_s:.0f}s:\n{self.start_log()}")

    def stop(self, grace_s: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
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
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

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
               cwd: str | Path, timeout: float = 600.0) -> subprocess.CompletedProcess:
        """``ray job submit`` and follow the logs until the job ends (exit 1 when it FAILED).

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
                "--", *entrypoint,
                cwd=cwd, timeout=timeout,
            )
            if "No available agent to submit job" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
                return proc
            time.sleep(2.0)

    def logs(self, submission_id: str) -> str:
        proc = self.ray_cli("job", "logs", "--address", self.address, submission_id)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout
