"""Shared pytest setup: keep every test on this machine and quiet; fixtures used by several test files.

Helpers shared by test files live in modules next to this one (``helpers``, ``loader_shards``,
``mlflow_server``, ``processed_fixture``, ``prepare_raw``, ``ray_head``, ``xdist_groups``, ``authors_golden``,
``authors_reference``); pytest puts ``tests/`` on ``sys.path``, and no test file imports another.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never let a test reach an external tracking server or Ray cluster by accident.
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Object storage: every s3:// and gs:// location of the session goes to the session's own servers on
# 127.0.0.1 (started on these ports by the s3_server / gcs_server fixtures when a test needs them), with
# dummy credentials; no cloud SDK may look for credentials on a metadata server (off this machine).
# Set before anything starts, so local Ray workers and subprocesses inherit the same storage.
from object_store import SESSION_GCS_PORT, SESSION_S3_PORT, gcs_env, s3_env  # noqa: E402

for _name in ("AWS_ENDPOINT_URL_S3", "DIPRO_S3_ENDPOINT", "DIPRO_GCS_ENDPOINT", "AWS_PROFILE", "AWS_SESSION_TOKEN",
              "GOOGLE_APPLICATION_CREDENTIALS"):
    os.environ.pop(_name, None)
os.environ.update(s3_env(f"http://127.0.0.1:{SESSION_S3_PORT}"))
os.environ.update(gcs_env(f"http://127.0.0.1:{SESSION_GCS_PORT}"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """Contract-format shards from ``loader_shards.write_shards`` (uneven sizes) and what was written in them.

    A test file that needs other shards defines its own ``shards`` fixture, which takes precedence.
    """
    from loader_shards import UNEVEN, write_shards

    root = tmp_path_factory.mktemp("shards")
    written = write_shards(root, {
        ("mortality_los", "train"): UNEVEN,
        ("mortality_los", "val"): [4, 6, 1],
        ("disease_progression", "train"): [5, 4],
        ("disease_progression", "test"): [3, 2],
    })
    return root, written


# ----------------------------------------------------------------------------- object storage servers

@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto S3 server on 127.0.0.1 for the session (tests/object_store.py); stopped by pid."""
    from object_store import S3Server

    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log", port=SESSION_S3_PORT)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    """One fake-gcs-server on 127.0.0.1 for the session; stopped by pid."""
    from object_store import GCSServer

    server = GCSServer(port=SESSION_GCS_PORT)
    try:
        yield server.start()
    finally:
        server.stop()


def _unique_bucket(request) -> str:
    import re
    import secrets

    stem = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return f"{stem}-{secrets.token_hex(3)}"


@pytest.fixture
def s3_bucket(request, s3_server, monkeypatch) -> str:
    """A new, empty bucket on the session's S3 server (``s3://NAME``), with this process's env pointed at it."""
    from object_store import s3_env

    for k, v in s3_env(s3_server.endpoint).items():
        monkeypatch.setenv(k, v)
    return s3_server.create_bucket(_unique_bucket(request))


@pytest.fixture
def gcs_bucket(request, gcs_server, monkeypatch) -> str:
    """A new, empty bucket on the session's GCS emulator (``gs://NAME``), with this process's env pointed at it."""
    from object_store import gcs_env

    for k, v in gcs_env(gcs_server.endpoint).items():
        monkeypatch.setenv(k, v)
    return gcs_server.create_bucket(_unique_bucket(request))


@pytest.fixture(params=["s3", "gs"])
def bucket(request) -> str:
    """The same test on an S3 bucket and on a GCS bucket."""
    return request.getfixturevalue("s3_bucket" if request.param == "s3" else "gcs_bucket")


# ----------------------------------------------------------------------------- pytest-xdist scheduling

def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``: files, and one group for the Ray-training files (``xdist_groups``)."""
    from xdist_groups import make_scheduler

    return make_scheduler(config, log)


def pytest_collection_modifyitems(config, items):
    """Put the Ray-training group first: a stable sort, so the order is the same on every worker (xdist
    requires that) and tests keep their order within a file; without xdist only the order changes."""
    from xdist_groups import RAY_GROUP, xdist_group_of

    items.sort(key=lambda item: xdist_group_of(item.nodeid) != RAY_GROUP)
