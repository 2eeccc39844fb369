"""Resolve the MLflow tracking URI and check that it can be reached.

Resolution order: ``cfg.tracking.uri`` -> ``$MLFLOW_TRACKING_URI`` ->
``sqlite:///<cwd>/mlflow.db`` (MLflow 3 refuses the plain ``./mlruns`` file
store by default, and the model registry needs a database backend).

An ``http(s)`` URI is probed (``GET /health``) with a short timeout *before*
any Ray worker starts, so a typo or a stopped server is a one-line
:class:`~data_sharding.errors.UserError` naming the URI instead of a training job that
dies minutes later.

Secrets: credentials in a tracking URI (``https://user:password@host``, a token in the
query string ``?token=...``) never appear in a message, a log line, an MLflow param or
tag, a saved ``config.yaml`` or a Ray runtime env.  :func:`resolve_tracking_uri` takes
them out of an http(s) URI and hands them to MLflow the way it expects them
(``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``
in this process's environment, read by MLflow on every request); a tracker carries them
to the Ray workers inside its pickled state.  Anything shown or saved goes through
:func:`redact_uri` (a database URI keeps its password for use, and shows ``***``).
"""
from __future__ import annotations

import base64
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from data_sharding.errors import UserError

DEFAULT_DB_NAME = "mlflow.db"
PROBE_TIMEOUT_S = 5.0

#: The environment variables MLflow reads its credentials from.
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
#: Query parameters that carry a bearer token (moved to MLFLOW_TRACKING_TOKEN).
TOKEN_PARAMS = {"token", "access_token", "auth_token", "api_token"}
#: Query parameter names whose values are never shown.
_SECRET_PARAM = re.compile(r"pass|secret|token|key|sig|auth|cred", re.IGNORECASE)
MASK = "***"


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """An http(s) URI without its credentials, and those credentials as MLflow's env variables.

    ``https://u:p@host/x?token=t&a=1`` -> (``https://host/x?a=1``, {USERNAME: u, PASSWORD: p,
    TOKEN: t}).  Other schemes are returned unchanged (a database URI needs its password).
    """
    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https"):
        return uri, {}
    creds: dict[str, str] = {}
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, has_password, password = userinfo.partition(":")
        creds["MLFLOW_TRACKING_USERNAME"] = unquote(user)
        if has_password:
            creds["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    query = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() in TOKEN_PARAMS:
            creds["MLFLOW_TRACKING_TOKEN"] = value
        else:
            query.append((key, value))
    if not creds:
        return uri, {}
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment)), creds


def redact_uri(uri: str | None) -> str | None:
    """``uri`` as it may be printed, logged or saved: no credentials, secret-looking query values masked."""
    if not uri or "://" not in uri:
        return uri
    uri, _ = split_credentials(uri)
    parts = urlsplit(uri)
    netloc = parts.netloc
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if "@" not in netloc and not any(_SECRET_PARAM.search(k) for k, _ in pairs):
        return uri
    if "@" in netloc:  # a database URI: user:password@host
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if has_password else f"{MASK}@{host}"
    query = [(k, MASK if _SECRET_PARAM.search(k) else v) for k, v in pairs]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="*"), parts.fragment))


def redact_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict (``dipro.config.to_dict``) whose ``tracking.uri`` is redacted (a copy when changed)."""
    tracking = data.get("tracking")
    if isinstance(tracking, dict) and tracking.get("uri"):
        safe = redact_uri(tracking["uri"])
        if safe != tracking["uri"]:
            return {**data, "tracking": {**tracking, "uri": safe}}
    return data


def apply_credentials(creds: dict[str, str]) -> None:
    """Put credentials where MLflow reads them (this process's environment; inherited by its children)."""
    for key, value in creds.items():
        if key in CREDENTIAL_ENV:
            os.environ[key] = value


def current_credentials() -> dict[str, str]:
    """The MLflow credential variables set in this process."""
    return {k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)}


def default_uri(cwd: str | os.PathLike | None = None) -> str:
    """``sqlite:///<abs cwd>/mlflow.db`` (absolute, so Ray workers in other dirs agree)."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    return f"sqlite:///{(base / DEFAULT_DB_NAME).resolve()}"


def resolve_tracking_uri(cfg: Any | None = None, explicit: str | None = None) -> str:
    """The tracking URI for this process: explicit -> cfg.tracking.uri -> env -> sqlite in cwd.

    Relative sqlite paths are made absolute so that a URI handed to Ray workers
    (which run in their own working directories) points at the same database.
    Credentials in an http(s) URI are moved into MLflow's environment variables
    (:func:`split_credentials`): the URI returned holds none.
    """
    uri = explicit
    if not uri and cfg is not None:
        uri = getattr(getattr(cfg, "tracking", None), "uri", None)
    if not uri:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    if not uri:
        return default_uri()
    uri, creds = split_credentials(uri)
    apply_credentials(creds)
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
        uri, creds = split_credentials(uri)
        creds = {**current_credentials(), **creds}
        url = uri.rstrip("/") + "/health"
        shown = redact_uri(url)
        request = urllib.request.Request(url)
        if creds.get("MLFLOW_TRACKING_TOKEN"):
            request.add_header("Authorization", f"Bearer {creds['MLFLOW_TRACKING_TOKEN']}")
        elif "MLFLOW_TRACKING_USERNAME" in creds:
            pair = f"{creds['MLFLOW_TRACKING_USERNAME']}:{creds.get('MLFLOW_TRACKING_PASSWORD', '')}"
            request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (http(s) only)
                if resp.status != 200:
                    return f"GET {shown} answered HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            return f"GET {shown} answered HTTP {exc.code}"
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"GET {shown} failed ({reason})"
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
            f"MLflow tracking server {redact_uri(uri)} is not reachable: {reason}. Start it, fix tracking.uri / "
            "MLFLOW_TRACKING_URI, or set tracking.enabled=false"
        )
