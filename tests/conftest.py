"""Shared pytest setup: keep every test on this machine and quiet; fixtures used by several test files.

Helpers shared by test files live in modules next to this one (``helpers``, ``loader_shards``,
``mlflow_server``, ``processed_fixture``, ``prepare_raw``, ``ray_head``); pytest puts ``tests/`` on
``sys.path``, and no test file imports another.
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
