"""Resolve the MLflow tracking URI and check that it can be reached.

Resolution order: ``cfg.tracking.uri`` -> ``$MLFLOW_TRACKING_URI`` ->
``sqlite:///<cwd>/mlflow.db`` (MLflow 3 refuses the plain ``./mlruns`` file
store by default, and the model registry needs a database backend).

An ``http(s)`` URI is probed (``GET /health``) with a short timeout *before*
any Ray worker starts, so a typo or a stopped server is a one-line
:class:`~data_sharding.errors.UserError` naming the URI instead of a training job that
dies minutes later.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from data_sharding.errors import UserError

DEFAULT_DB_NAME = "mlflow.db"
PROBE_TIMEOUT_S = 5.0


def default_uri(cwd: str | os.PathLike | None = None) -> str:
    """``sqlite:///<abs cwd>/mlflow.db`` (absolute, so Ray workers in other dirs agree)."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    return f"sqlite:///{(base / DEFAULT_DB_NAME).resolve()}"


def resolve_tracking_uri(cfg: Any | None = None, explicit: str | None = None) -> str:
    """The tracking URI for this process: explicit -> cfg.tracking.uri -> env -> sqlite in cwd.

    Relative sqlite paths are made absolute so that a URI handed to Ray workers
    (which run in their own working directories) points at the same database.
    """
    uri = explicit
    if not uri and cfg is not None:
        uri = getattr(getattr(cfg, "tracking", None), "uri", None)
    if not uri:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    if not uri:
        return default_uri()
    return _absolutize_sqlite(uri)


def _absolutize_sqlite(uri: str) -> str:
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = uri[len(prefix):]
        if path and not path.startswith("/") and path != ":memory:":
            return prefix + str(Path(path).resolve())
    return uri


def is_http(uri: str) -> bool:
    return uri.startswith("http://") or uri.startswith("https://")


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Return None when ``uri`` is usable, else a short reason (no exception).

    http(s): ``GET {uri}/health`` must answer 200 within ``timeout``.
    sqlite: the database's directory must exist and be writable.
    """
    if is_http(uri):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http(s) only)
                if resp.status != 200:
                    return f"GET {url} answered HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            return f"GET {url} answered HTTP {exc.code}"
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"GET {url} failed ({reason})"
        return None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            return f"directory {db.parent} of the sqlite database does not exist"
        if not os.access(db.parent, os.W_OK):
            return f"directory {db.parent} of the sqlite database is not writable"
    return None


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`UserError` naming ``uri`` when the tracking backend cannot be used."""
    reason = probe(uri, timeout)
    if reason is not None:
        raise UserError(
            f"MLflow tracking server {uri} is not reachable: {reason}. Start it, fix tracking.uri / "
            "MLFLOW_TRACKING_URI, or set tracking.enabled=false"
        )
