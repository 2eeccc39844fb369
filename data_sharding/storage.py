"""Where data lives: one storage layer for local paths, ``s3://`` and ``gs://``; the only module that knows schemes.

    loc = storage.resolve("s3://bucket/dipro/shards")     # or "gs://...", "/abs/path", "relative/path"
    with (loc / "manifest.parquet").open_input() as f: ...  # buffered, read-ahead, retried
    (loc / "x.json").write_bytes(data)                     # one atomic PUT (local: temp + rename)
    token = (loc / "manifest.parquet").put(data, if_match=old_token)   # conditional write: commit points

A :class:`Location` is a resolved place: :attr:`Location.fs` / :attr:`Location.fs_path` are the
``pyarrow.fs`` filesystem and path (what Ray Train's ``storage_filesystem`` and pyarrow readers take);
the conditional writes and the ETag-carrying listings that ``pyarrow.fs`` does not offer go through the
scheme's own client (boto3 for S3, google-cloud-storage for GCS), created here and nowhere else.

Endpoints and credentials come from the standard sources, never from the URI:

* S3: credentials from the AWS chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_SESSION_TOKEN``, ``~/.aws``, the node's IAM role / IRSA); endpoint from ``DIPRO_S3_ENDPOINT``
  (what the config key ``storage.s3_endpoint`` sets), else ``AWS_ENDPOINT_URL_S3``, else
  ``AWS_ENDPOINT_URL`` (MinIO, Ceph, a local test server); region ``AWS_REGION`` /
  ``AWS_DEFAULT_REGION`` (default us-east-1).  pyarrow's S3 client ignores ``AWS_ENDPOINT_URL``
  (it would go to amazonaws.com), so the endpoint is always passed explicitly.
* GCS: ``STORAGE_EMULATOR_HOST`` (an emulator: anonymous access) or ``DIPRO_GCS_ENDPOINT``
  (``storage.gcs_endpoint``); otherwise Google's default credentials (workload identity,
  ``GOOGLE_APPLICATION_CREDENTIALS``).
* A URI with a query string or user info (``s3://KEY:SECRET@bucket``, ``?access_key=``) is refused:
  a secret in a path would be printed and saved with it.  Nothing here logs or stores credentials;
  :func:`redact` masks anything secret-looking in text that is shown.

Reads (:meth:`Location.open_input`) fetch fixed-size ranges (8 MiB by default) with the next range
already in flight, so a sequential walk (a tar shard) costs one request per chunk and overlaps the
network with the caller's work; seeking forward skips without reading.  Transient failures
(connection reset or refused, timeouts, HTTP 5xx, throttling) are retried with exponential backoff
and jitter and counted (:func:`counters`: what the loader reports in the run's metrics); a missing
object, missing bucket or refused credentials is one line naming the URI (:class:`StorageAccessError`).

Writes: :meth:`Location.write_bytes` is one PUT (atomic on an object store; temp + rename on a local
disk).  :meth:`Location.open_output` streams a large object; a stream closed by an exception has
already published what it held (pyarrow completes the upload), so the object is deleted again and the
error raised: writers put such objects under names that no committed manifest refers to
(:func:`new_generation`), and publish by a conditional write of the manifest alone
(:meth:`Location.put` with ``if_absent`` / ``if_match``).  A killed process leaves at most an
invisible pending multipart upload (cluster/README.md: the bucket's lifecycle rule removes them).
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import re
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

from data_sharding.errors import ConfigError, UserError

SCHEMES = ("s3", "gs")
CHUNK_BYTES = 8 << 20
"""Range size of remote reads (a 50 MB tar through 10 KB ranges took 128 s against a local S3
server, through 8 MiB ranges 0.22 s: STACK_NOTES.md)."""
READAHEAD_CHUNKS = 1
RETRY_ATTEMPTS = 6
RETRY_BASE_S = 0.2
RETRY_MAX_S = 5.0
ENDPOINT_ENV = {"s3": ("DIPRO_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
                "gs": ("DIPRO_GCS_ENDPOINT", "STORAGE_EMULATOR_HOST")}

T = TypeVar("T")


class StorageAccessError(UserError):
    """A location that cannot be used: missing object or bucket, refused credentials, unreachable endpoint."""


class NotFound(StorageAccessError, FileNotFoundError):
    """No object (or file) at the location."""


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (``if_absent``) or changed (``if_match``)."""


# ----------------------------------------------------------------------------- counters

class Counters:
    """Thread-safe counts of one process (loader workers send theirs to the main process with each batch)."""

    def __init__(self) -> None:
        self._counts: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


_COUNTERS = Counters()
_count = _COUNTERS.add


def counters() -> dict[str, int]:
    """This process's storage counters: ``retries`` (transient failures retried), ``requests``, ``bytes_read``."""
    return _COUNTERS.snapshot()


# ----------------------------------------------------------------------------- secrets

_URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
_SECRET_QUERY = re.compile(r"([?&][^=&\s]*(?:pass|secret|token|key|sig|auth|cred)[^=&\s]*=)[^&\s'\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with URL user info (``user:password@``) and secret-looking query values masked."""
    return _SECRET_QUERY.sub(r"\1***", _URL_USERINFO.sub(r"\1***@", str(text)))


# ----------------------------------------------------------------------------- resolving

def scheme_of(location: str | os.PathLike) -> str:
    """``"s3"``, ``"gs"`` or ``""`` (a local path)."""
    if isinstance(location, Location):
        return location.scheme
    text = os.fspath(location)
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head.lower() in SCHEMES else ""


def is_remote(location: str | os.PathLike) -> bool:
    return bool(scheme_of(location))


def resolve(location: "str | os.PathLike | Location") -> "Location":
    """A :class:`Location` for a local path (made absolute) or an ``s3://`` / ``gs://`` URI.

    ConfigError for an unknown scheme, a URI without bucket, or one that carries credentials
    or options (they belong in the environment: see the module docstring).
    """
    if isinstance(location, Location):
        return location
    text = os.fspath(location)
    if not text:
        raise ConfigError("empty storage location: expected a path or an s3:// / gs:// URI")
    head, sep, _ = text.partition("://")
    if sep and head.lower() == "file":
        text = text[len("file://"):]
    elif sep:
        scheme = head.lower()
        if scheme not in SCHEMES:
            raise ConfigError(f"{redact(text)}: unsupported storage scheme {head!r}: expected a local path, "
                              f"s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
        parts = urlsplit(text)
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise ConfigError(f"{redact(text)}: a storage URI takes no credentials or options; endpoints come from "
                              f"{' / '.join(ENDPOINT_ENV[scheme])} (or storage.{scheme}_endpoint), credentials "
                              "from the standard credential chain")
        bucket = parts.netloc
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]", bucket):
            raise ConfigError(f"{text}: {bucket!r} is not a bucket name (3-63 lowercase letters, digits, '.', '-')")
        key = PurePosixPath("/" + parts.path).as_posix().strip("/")
        key = "" if key == "." else key
        return Location(scheme, bucket, key)
    return Location("", "", str(Path(text).expanduser().resolve()))


def new_generation() -> str:
    """A name part no earlier writer used: UTC time + random (``20261202T140501-9f3a1c``)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _endpoint(scheme: str) -> str | None:
    for name in ENDPOINT_ENV[scheme]:
        value = os.environ.get(name, "").strip()
        if value:
            return value if "://" in value else f"http://{value}"
    return None


def configure(s3_endpoint: str | None = None, gcs_endpoint: str | None = None) -> None:
    """Set explicit endpoints (the config keys ``storage.s3_endpoint`` / ``storage.gcs_endpoint``).

    They go into this process's environment (``DIPRO_S3_ENDPOINT`` / ``DIPRO_GCS_ENDPOINT``), so
    subprocesses and Ray workers started from here see the same storage.  Endpoints are not secrets.
    """
    for name, value in (("DIPRO_S3_ENDPOINT", s3_endpoint), ("DIPRO_GCS_ENDPOINT", gcs_endpoint)):
        if value:
            os.environ[name] = value
    _filesystem.cache_clear()
    _client.cache_clear()


_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "GOOGLE_APPLICATION_CREDENTIALS")


def _env_key(scheme: str) -> tuple:
    """What a cached client depends on.  The pid: clients are not shared with forked children (loader
    workers); the credentials only as a digest, so a changed credential gets a new client."""
    import hashlib

    creds = hashlib.sha256("\0".join(os.environ.get(n, "") for n in _CREDENTIAL_ENV).encode()).hexdigest()
    return (scheme, os.getpid(), _endpoint(scheme), os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            os.environ.get("STORAGE_EMULATOR_HOST"), creds)


def filesystem(scheme: str, own_retries: bool = True):
    """The ``pyarrow.fs`` filesystem for ``scheme`` ("" = local), built from the environment (cached).

    ``own_retries=False``: pyarrow does not retry (the ranged reader retries, and counts, itself).
    """
    return _filesystem(_env_key(scheme) if scheme else ("", 0), own_retries)


@functools.lru_cache(maxsize=None)
def _filesystem(key: tuple, own_retries: bool = True):
    import pyarrow.fs as pafs

    scheme = key[0]
    attempts = RETRY_ATTEMPTS if own_retries else 1
    if not scheme:
        return pafs.LocalFileSystem()
    endpoint = _endpoint(scheme)
    kw: dict[str, Any] = {}
    if endpoint:
        parts = urlsplit(endpoint)
        kw.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
    if scheme == "s3":
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        # Retries of reads are this module's (counted); pyarrow's own cover writes and metadata calls.
        return pafs.S3FileSystem(region=region, connect_timeout=10, request_timeout=60,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kw)
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        kw["anonymous"] = True
    from datetime import timedelta

    return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=60 if own_retries else 1), **kw)


def client(scheme: str):
    """The scheme's own client (boto3 S3 client / google.cloud.storage.Client), from the environment (cached)."""
    return _client(_env_key(scheme))


@functools.lru_cache(maxsize=None)
def _client(key: tuple):
    scheme = key[0]
    endpoint = _endpoint(scheme)
    if scheme == "s3":
        import boto3
        from botocore.config import Config as BotoConfig

        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name=region,
            config=BotoConfig(retries={"mode": "standard", "max_attempts": RETRY_ATTEMPTS},
                              connect_timeout=10, read_timeout=60))
    from google.cloud import storage as gcs

    if os.environ.get("STORAGE_EMULATOR_HOST") or endpoint:
        from google.auth.credentials import AnonymousCredentials

        creds = AnonymousCredentials() if os.environ.get("STORAGE_EMULATOR_HOST") else None
        return gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "dipro"), credentials=creds,
                          client_options={"api_endpoint": endpoint})
    return gcs.Client()


# ----------------------------------------------------------------------------- errors and retries

_TRANSIENT_TEXT = re.compile(
    r"SERVICE_UNAVAILABLE|SLOW_DOWN|SlowDown|THROTTL|Throttl|INTERNAL_FAILURE|InternalError|NETWORK_CONNECTION|"
    r"REQUEST_TIMEOUT|RequestTimeout|Connection reset|connection reset|Connection refused|Broken pipe|"
    r"timed out|Timeout|curlCode: (?:7|18|28|52|55|56)|HTTP status 5\d\d|status code 5\d\d|\b50[0234]\b|"
    r"Empty reply|Recv failure|Send failure|IncompleteRead|RemoteDisconnected|ProtocolError")


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: connection problems, timeouts, HTTP 5xx, throttling."""
    if isinstance(exc, (PreconditionFailed, NotFound, ConfigError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    code = _http_status(exc)
    if code is not None:
        return code >= 500 or code in (408, 429)
    name = type(exc).__name__
    if name in ("EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                "ServiceUnavailable", "InternalServerError", "TooManyRequests", "GatewayTimeout", "BadGateway",
                "ChunkedEncodingError", "IncompleteRead"):
        return True
    return bool(_TRANSIENT_TEXT.search(str(exc)))


def _http_status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):  # botocore ClientError
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    code = getattr(exc, "code", None)  # google.api_core exceptions
    return int(code) if isinstance(code, int) and 100 <= code < 600 else None


def _error_code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code", ""))
    return type(exc).__name__


def retrying(op: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS) -> T:
    """``op()``, retried on transient failures with exponential backoff and jitter (each retry counted)."""
    delay = RETRY_BASE_S
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except BaseException as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            _count("retries")
            time.sleep(min(RETRY_MAX_S, delay) * (0.5 + random.random()))
            delay *= 2
    raise AssertionError("unreachable")


def access_error(exc: BaseException, uri: str, doing: str = "read") -> StorageAccessError | None:
    """One line naming ``uri`` for a missing object/bucket, refused credentials or an unreachable endpoint.

    For a local path only a missing file is translated (:class:`NotFound`); other OS errors keep their type.
    """
    if isinstance(exc, StorageAccessError):
        return exc
    if not scheme_of(uri):
        return NotFound(f"{uri}: no such file ({doing})") if isinstance(exc, FileNotFoundError) else None
    text, code, status = str(exc), _error_code(exc), _http_status(exc)
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in code or "bucket does not exist" in text.lower():
        return StorageAccessError(f"{uri}: no such bucket ({doing}); create it or fix the location")
    if (isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404", "NotFound") or status == 404
            or "NO_SUCH_KEY" in text or "Path does not exist" in text):
        return NotFound(f"{uri}: no such object ({doing})")
    if (code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "Unauthorized",
                 "ExpiredToken", "InvalidToken") or status in (401, 403)
            or re.search(r"ACCESS_DENIED|INVALID_ACCESS_KEY|SIGNATURE_DOES_NOT_MATCH|AccessDenied|HTTP status 40[13]|"
                         r"InvalidAccessKeyId|SignatureDoesNotMatch", text)):
        return StorageAccessError(f"{uri}: access denied ({doing}): the credentials from the standard chain were "
                                  "refused (check AWS_ACCESS_KEY_ID / AWS_PROFILE / the node's role, or the GCP "
                                  "service account); they are never printed")
    if is_transient(exc):
        return StorageAccessError(f"{uri}: storage unavailable ({doing}) after {RETRY_ATTEMPTS} attempts: "
                                  f"{redact(_short(exc))}")
    return None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:240] + "...") if len(text) > 240 else text or type(exc).__name__


@contextlib.contextmanager
def errors_named(uri: str, doing: str = "read") -> Iterator[None]:
    """Re-raise storage failures inside as the one-line :class:`StorageAccessError` naming ``uri``."""
    try:
        yield
    except BaseException as exc:
        err = access_error(exc, uri, doing)
        if err is not None and err is not exc:
            raise err from exc
        raise


# ----------------------------------------------------------------------------- objects

@dataclass(frozen=True)
class ObjectInfo:
    """One file or object: ``path`` relative to the listed location (posix), size, mtime, version token."""

    path: str
    size: int
    mtime_ns: int
    token: str
    """ETag (S3), generation (GCS) or ``size:mtime_ns`` (local): changes whenever the content is replaced."""


@dataclass(frozen=True)
class Location:
    """A resolved place: ``scheme`` "" (local, ``key`` an absolute path), "s3" or "gs" (``bucket`` + ``key``)."""

    scheme: str
    bucket: str
    key: str

    # -- naming
    @property
    def uri(self) -> str:
        if not self.scheme:
            return self.key
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        if self.scheme:
            raise TypeError(f"{self.uri} is not a local path")
        return self.key

    @property
    def is_remote(self) -> bool:
        return bool(self.scheme)

    @property
    def local(self) -> Path:
        """The local path (TypeError for a bucket location)."""
        return Path(os.fspath(self))

    @property
    def native(self) -> "Path | Location":
        """A :class:`~pathlib.Path` for a local location, the location itself on a bucket: what APIs that
        have always handed out local paths (run directories, checkpoints) return, unchanged for local runs."""
        return self if self.scheme else Path(self.key)

    @property
    def fs(self):
        """The ``pyarrow.fs`` filesystem."""
        return filesystem(self.scheme)

    @property
    def fs_path(self) -> str:
        """The path on :attr:`fs` (``bucket/key`` for a bucket, the absolute path locally)."""
        return f"{self.bucket}/{self.key}".rstrip("/") if self.scheme else self.key

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def parent(self) -> "Location":
        return Location(self.scheme, self.bucket, str(PurePosixPath(self.key).parent) if self.scheme
                        else str(Path(self.key).parent)) if self.key else self

    def __truediv__(self, rel: str | os.PathLike) -> "Location":
        return self.join(rel)

    def join(self, *parts: str | os.PathLike) -> "Location":
        rel = PurePosixPath(*[os.fspath(p) for p in parts])
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{rel}: expected a relative path without '..'")
        if not self.scheme:
            return Location("", "", str(Path(self.key, *rel.parts)))
        key = "/".join(p for p in (self.key, rel.as_posix()) if p and p != ".")
        return Location(self.scheme, self.bucket, key)

    def relative_to(self, root: "Location") -> str:
        if self.scheme != root.scheme or self.bucket != root.bucket:
            raise ValueError(f"{self} is not under {root}")
        return PurePosixPath(self.key).relative_to(PurePosixPath(root.key)).as_posix()

    # -- metadata
    def stat(self) -> ObjectInfo:
        """Size, mtime and version token of this file/object (NotFound naming the URI)."""
        with errors_named(self.uri, "stat"):
            if not self.scheme:
                st = os.stat(self.key)
                return ObjectInfo(self.name, st.st_size, st.st_mtime_ns, f"{st.st_size}:{st.st_mtime_ns}")
            if self.scheme == "s3":
                head = retrying(lambda: client("s3").head_object(Bucket=self.bucket, Key=self.key), self.uri)
                mtime = int(head["LastModified"].timestamp() * 1e9)
                return ObjectInfo(self.name, int(head["ContentLength"]), mtime, head["ETag"].strip('"'))
            blob = retrying(lambda: client("gs").bucket(self.bucket).get_blob(self.key), self.uri)
            if blob is None:
                raise NotFound(f"{self.uri}: no such object (stat)")
            return _blob_info(blob, self.name)

    def exists(self) -> bool:
        """True when a file/object (or, locally, a directory) is here."""
        if not self.scheme:
            return os.path.exists(self.key)
        try:
            self.stat()
            return True
        except NotFound:
            return False

    def is_file(self) -> bool:
        """A regular file (local) / an object (bucket) is here."""
        return os.path.isfile(self.key) if not self.scheme else self.exists()

    def is_dir(self) -> bool:
        """Locally a directory; on a bucket, a prefix with at least one object under it."""
        if not self.scheme:
            return os.path.isdir(self.key)
        return bool(self.list(limit=1))

    def list(self, limit: int | None = None) -> list[ObjectInfo]:
        """Every file/object under this location (recursive), sorted by path, with size, mtime and token.

        One paginated listing on a bucket (ETags included: no request per object).
        """
        out: list[ObjectInfo] = []
        with errors_named(self.uri, "list"):
            if not self.scheme:
                root = Path(self.key)
                if root.is_dir():
                    for p in sorted(root.rglob("*")):
                        if p.is_file():
                            st = p.stat()
                            out.append(ObjectInfo(p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns,
                                                  f"{st.st_size}:{st.st_mtime_ns}"))
                            if limit and len(out) >= limit:
                                break
                return out
            prefix = f"{self.key}/" if self.key else ""
            # Keys ending in "/" are directory markers (pyarrow's create_dir, Ray Train's storage setup, console
            # "folders"): not objects of this location. ``limit`` counts real objects only.
            if self.scheme == "s3":
                def page_all() -> list[ObjectInfo]:
                    found = []
                    pages = client("s3").get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
                    for page in pages:
                        for obj in page.get("Contents", []):
                            if not obj["Key"].endswith("/"):
                                found.append(ObjectInfo(obj["Key"][len(prefix):], int(obj["Size"]),
                                                        int(obj["LastModified"].timestamp() * 1e9),
                                                        obj["ETag"].strip('"')))
                        if limit and len(found) >= limit:
                            break
                    return found[:limit] if limit else found
            else:
                def page_all() -> list[ObjectInfo]:
                    found = []
                    for blob in client("gs").list_blobs(self.bucket, prefix=prefix):
                        if not blob.name.endswith("/"):
                            found.append(_blob_info(blob, blob.name[len(prefix):]))
                            if limit and len(found) >= limit:
                                break
                    return found
            out = retrying(page_all, self.uri)
        return sorted((o for o in out if o.path), key=lambda o: o.path)

    # -- reading
    def open_input(self, chunk_bytes: int = CHUNK_BYTES, readahead: int = READAHEAD_CHUNKS,
                   stop: int | None = None) -> IO[bytes]:
        """A seekable binary reader: local file, or ranged reads of ``chunk_bytes`` with ``readahead``
        further chunks fetched in the background, retried on transient failures.

        ``stop``: on a bucket, the object ends there for this reader (no range reaches past it), for a
        caller that knows where the bytes it needs end; a local file ignores it."""
        if not self.scheme:
            with errors_named(self.uri):
                return open(self.key, "rb", buffering=1 << 20)
        return io.BufferedReader(_RangeReader(self, chunk_bytes, readahead, stop), buffer_size=1 << 16)

    def read_bytes(self) -> bytes:
        if not self.scheme:
            with errors_named(self.uri):
                return Path(self.key).read_bytes()
        with self.open_input() as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def read_versioned(self) -> tuple[bytes, str]:
        """The content and the version token of exactly that content (what a later ``put(if_match=)``
        must name): one GET that returns both on a bucket; locally stat, read, stat until they agree."""
        with errors_named(self.uri):
            if not self.scheme:
                for _ in range(10):
                    before = self.stat().token
                    data = Path(self.key).read_bytes()
                    if self.stat().token == before:
                        return data, before
                raise OSError(f"{self.key} keeps changing while it is read")
            if self.scheme == "s3":
                def get() -> tuple[bytes, str]:
                    resp = client("s3").get_object(Bucket=self.bucket, Key=self.key)
                    return resp["Body"].read(), resp["ETag"].strip('"')
                return retrying(get, self.uri)

            def get_gcs() -> tuple[bytes, str]:
                blob = client("gs").bucket(self.bucket).get_blob(self.key)
                if blob is None:
                    raise NotFound(f"{self.uri}: no such object (read)")
                return blob.download_as_bytes(if_generation_match=blob.generation), str(blob.generation)
            return retrying(get_gcs, self.uri)

    # -- writing
    def write_bytes(self, data: bytes, unchanged: str = "") -> str:
        """Write the whole object at once (atomic: one PUT; locally temp + rename). Returns the version token."""
        return self.put(data, unchanged=unchanged)

    def write_text(self, text: str, unchanged: str = "") -> str:
        return self.write_bytes(text.encode("utf-8"), unchanged=unchanged)

    def put(self, data: bytes, *, if_absent: bool = False, if_match: str | None = None, unchanged: str = "") -> str:
        """Write ``data`` here in one step, optionally only if nothing is here (``if_absent``) or only if
        the current version token is ``if_match``; :class:`PreconditionFailed` when the condition fails.
        Returns the new version token.

        Buckets do this server-side (S3 ``If-None-Match: *`` / ``If-Match: ETag``, GCS
        ``ifGenerationMatch``), so of two writers exactly one wins.  Locally ``if_absent`` is an
        atomic ``link``; ``if_match`` compares then renames (local writers also hold a ``flock``).
        """
        if not self.scheme:
            return self._put_local(data, if_absent, if_match, unchanged)
        with errors_named(self.uri, "write"):
            if self.scheme == "s3":
                kw: dict[str, Any] = {}
                if if_absent:
                    kw["IfNoneMatch"] = "*"
                elif if_match is not None:
                    kw["IfMatch"] = f'"{if_match}"' if not if_match.startswith('"') else if_match
                try:
                    resp = retrying(lambda: client("s3").put_object(Bucket=self.bucket, Key=self.key, Body=data, **kw),
                                    self.uri)
                except Exception as exc:
                    if _error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict") or \
                            (if_match is not None and _error_code(exc) == "NoSuchKey"):
                        raise PreconditionFailed(f"{self.uri}: {'exists' if if_absent else 'changed'}") from None
                    raise
                return resp["ETag"].strip('"')
            from google.api_core import exceptions as gexc

            blob = client("gs").bucket(self.bucket).blob(self.key)
            cond = 0 if if_absent else (int(if_match) if if_match is not None else None)
            try:
                retrying(lambda: blob.upload_from_string(data, if_generation_match=cond), self.uri)
            except (gexc.PreconditionFailed, gexc.NotFound) as exc:
                if cond is None or (isinstance(exc, gexc.NotFound) and "bucket" in str(exc).lower()):
                    raise
                raise PreconditionFailed(f"{self.uri}: {'exists' if if_absent else 'changed'}") from None
            return str(blob.generation)

    def _put_local(self, data: bytes, if_absent: bool, if_match: str | None, unchanged: str) -> str:
        from data_sharding import atomic

        path = Path(self.key)
        if if_absent:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = atomic.temp_path(path)
            try:
                atomic.write_bytes(tmp, data, unchanged=unchanged)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise PreconditionFailed(f"{path}: exists") from None
            finally:
                tmp.unlink(missing_ok=True)
        else:
            if if_match is not None:
                try:
                    current = self.stat().token
                except NotFound:
                    current = None
                if current != if_match:
                    raise PreconditionFailed(f"{path}: changed")
            atomic.write_bytes(path, data, unchanged=unchanged)
        return self.stat().token

    @contextlib.contextmanager
    def open_output(self, unchanged: str = "") -> Iterator[IO[bytes]]:
        """Stream a (large) object here.  Locally: temp file + rename.  On a bucket: a multipart upload to
        this key, published when the block ends; on an exception the object is deleted again (see the
        module docstring: stream only to names no manifest refers to yet)."""
        from data_sharding import atomic

        if not self.scheme:
            with atomic.open_atomic(self.key, "wb", unchanged=unchanged) as f:
                yield f
            return
        stream = None
        try:
            with errors_named(self.uri, "write"):
                stream = self.fs.open_output_stream(self.fs_path, compression=None)  # never by file extension
            yield stream
            with errors_named(self.uri, "write"):
                stream.close()
        except BaseException:
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
                with contextlib.suppress(Exception):
                    self.delete()
            raise

    def delete(self, if_match: str | None = None) -> None:
        """Remove this file/object (no error when absent); ``if_match``: only this version (S3/GCS)."""
        with errors_named(self.uri, "delete"):
            if not self.scheme:
                if if_match is not None and self.exists() and self.stat().token != if_match:
                    raise PreconditionFailed(f"{self.key}: changed")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.key)
                return
            if self.scheme == "s3":
                kw = {"IfMatch": f'"{if_match}"'} if if_match is not None else {}
                try:
                    retrying(lambda: client("s3").delete_object(Bucket=self.bucket, Key=self.key, **kw), self.uri)
                except Exception as exc:
                    if _error_code(exc) == "PreconditionFailed":
                        raise PreconditionFailed(f"{self.uri}: changed") from None
                    if _error_code(exc) != "NoSuchKey":
                        raise
                return
            from google.api_core import exceptions as gexc

            blob = client("gs").bucket(self.bucket).blob(self.key)
            try:
                retrying(lambda: blob.delete(if_generation_match=int(if_match) if if_match else None), self.uri)
            except gexc.PreconditionFailed:
                raise PreconditionFailed(f"{self.uri}: changed") from None
            except gexc.NotFound:
                pass

    def remove_tree(self) -> None:
        """Remove everything under this location (a local directory tree, or every object under the prefix)."""
        if not self.scheme:
            import shutil

            shutil.rmtree(self.key, ignore_errors=True)
            return
        for info in self.list():
            self.join(info.path).delete()

    def makedirs(self) -> None:
        """Create the local directory (buckets have no directories: nothing to do)."""
        if not self.scheme:
            os.makedirs(self.key, exist_ok=True)

    # -- copies between a local directory and here
    def upload_dir(self, local_dir: str | os.PathLike) -> None:
        """Copy every file under ``local_dir`` here (same relative paths)."""
        root = Path(local_dir)
        for p in sorted(root.rglob("*")):
            if p.is_file():
                dst = self.join(p.relative_to(root).as_posix())
                with open(p, "rb") as src, dst.open_output() as out:
                    for block in iter(lambda: src.read(CHUNK_BYTES), b""):
                        out.write(block)

    def download_dir(self, local_dir: str | os.PathLike) -> Path:
        """Copy every object under here into ``local_dir`` (same relative paths); returns ``local_dir``."""
        root = Path(local_dir)
        for info in self.list():
            dst = root / info.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            with self.join(info.path).open_input() as src, open(dst, "wb") as out:
                for block in iter(lambda: src.read(CHUNK_BYTES), b""):
                    out.write(block)
        return root


def _blob_info(blob, rel: str) -> ObjectInfo:
    updated = blob.updated.timestamp() if blob.updated else 0.0
    return ObjectInfo(rel, int(blob.size or 0), int(updated * 1e9), str(blob.generation))


# ----------------------------------------------------------------------------- ranged reader

_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool() -> ThreadPoolExecutor:
    """This process's read-ahead threads (a pool made before a fork has no threads in the child)."""
    pid = os.getpid()
    if pid not in _POOLS:
        _POOLS[pid] = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dipro-storage-readahead")
    return _POOLS[pid]


class _RangeReader(io.RawIOBase):
    """Seekable raw reader over an object: ``chunk_bytes`` ranges, ``readahead`` chunks fetched ahead.

    The ranges start where the first read starts (``base``), so a reader that seeks to the middle of
    an object first (a loader segment starting mid-shard) fetches nothing before that point.
    """

    def __init__(self, loc: Location, chunk_bytes: int, readahead: int, stop: int | None = None) -> None:
        super().__init__()
        self.loc, self.chunk, self.readahead = loc, max(1 << 16, int(chunk_bytes)), max(0, int(readahead))
        with errors_named(loc.uri):
            self._file = retrying(lambda: filesystem(loc.scheme, own_retries=False).open_input_file(loc.fs_path),
                                  loc.uri)
        self.size = self._file.size() if stop is None else min(self._file.size(), max(0, int(stop)))
        self.pos = 0
        self.base: int | None = None
        self._chunks: dict[int, Future | bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _span(self, index: int) -> tuple[int, int]:
        """``[start, stop)`` of chunk ``index`` (negative: before ``base``), clipped to the object."""
        start = self.base + index * self.chunk
        return max(0, start), min(self.size, start + self.chunk)

    def _fetch(self, index: int) -> bytes:
        start, stop = self._span(index)
        n = stop - start
        data = retrying(lambda: self._file.read_at(n, start), self.loc.uri)
        if len(data) != n:
            raise OSError(f"short read from {self.loc.uri}: {len(data)} of {n} bytes at {start} (connection reset?)")
        _count("requests")
        _count("bytes_read", n)
        return data

    def _get(self, index: int) -> bytes:
        for old in [k for k in self._chunks if k < index]:
            del self._chunks[old]
        # the chunks after this one go out first, so they travel while this one is awaited
        last = (self.size - 1 - self.base) // self.chunk
        for ahead in range(index + 1, min(last, index + self.readahead) + 1):
            if ahead not in self._chunks:
                self._chunks[ahead] = _pool().submit(self._fetch, ahead)
        item = self._chunks.get(index)
        if item is None:
            with errors_named(self.loc.uri):
                item = self._fetch(index)
        elif isinstance(item, Future):
            try:
                item = item.result()
            except BaseException:
                with errors_named(self.loc.uri):
                    item = self._fetch(index)  # the background fetch gave up: once more, in the foreground
        self._chunks[index] = item
        return item

    def readinto(self, buf) -> int:
        if self.pos >= self.size:
            return 0
        if self.base is None:
            self.base = self.pos
        index = (self.pos - self.base) // self.chunk
        data = self._get(index)
        offset = self.pos - self._span(index)[0]
        n = min(len(buf), len(data) - offset)
        buf[:n] = memoryview(data)[offset:offset + n]  # one copy, no intermediate slice
        self.pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            for item in self._chunks.values():
                if isinstance(item, Future):
                    item.cancel()
            self._chunks.clear()
            with contextlib.suppress(Exception):
                self._file.close()
        super().close()


def sha256_file(location, chunk: int = 1 << 20) -> str:
    """sha256 of a file's or object's bytes, read in ``chunk``-byte blocks (through the ranged reader on a bucket)."""
    import hashlib

    h = hashlib.sha256()
    with resolve(location).open_input() as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- WebDataset

def register_webdataset_schemes() -> None:
    """Let the stock ``webdataset`` reader open ``s3://`` and ``gs://`` shards through this layer::

        storage.register_webdataset_schemes()
        ds = webdataset.WebDataset("s3://bucket/shards/mortality_los/train-000000.tar")
    """
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module (the package exports a function of that name)

    def opener(url: str, mode: str = "rb", bufsize: int = 8192, **_kw):
        if "r" not in mode:
            raise ValueError(f"{url}: the storage layer's webdataset handler only reads (mode {mode!r})")
        return resolve(url).open_input()

    for scheme in SCHEMES:
        gopen.gopen_schemes[scheme] = opener
