"""Helpers shared by several test files (imported as ``helpers``; pytest puts ``tests/`` on ``sys.path``).

Test files never import each other: what two of them need lives here, in ``conftest.py`` (fixtures)
or in a helper module named for its concern (``prepare_raw``, ``processed_fixture``, ``ray_head``).
Nothing here depends on the working directory: paths are resolved from :data:`REPO`.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root (the folder holding ``configs/``, ``dipro/`` and ``tests/``)."""

CONFIGS = REPO / "configs"


def config_path(name: str) -> Path:
    """``configs/<name>.yaml`` of this checkout, whatever the working directory."""
    return CONFIGS / f"{name}.yaml"


def repo_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that must import this checkout's ``dipro`` / ``data_sharding``."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}
