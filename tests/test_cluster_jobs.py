"""The cluster job path, for real: a token-authenticated Ray head on 127.0.0.1
and the real ``ray job submit`` / ``ray job logs`` clients.

What a user does on a cluster (cluster/README.md) is done here against a local
head: the runtime env is cluster/runtime_env.yaml as committed (the repository
uploaded as the working dir, venv and data excluded) plus the MLflow URI; the
entrypoints are the project's own commands.  One head serves the whole module
and is stopped by its finalizer (see tests/ray_head.py for why not ``ray stop``).
"""
from __future__ import annotations

import sys
import urllib.error
import uuid
from pathlib import Path

import pytest
import yaml

from ray_head import RayHead

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head():
    h = RayHead(num_cpus=4)
    h.start()
    try:
        yield h
    finally:
        h.stop()


def runtime_env(**env_vars: str) -> dict:
    """cluster/runtime_env.yaml as committed, plus job-specific env vars."""
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env.setdefault("env_vars", {}).update(env_vars)
    return env


def sid(name: str) -> str:
    return f"dipro-test-{name}-{uuid.uuid4().hex[:8]}"


def test_token_auth_is_enforced(head):
    with pytest.raises(urllib.error.HTTPError) as exc:
        head.api("/api/jobs/", token=None)
    assert exc.value.code in (401, 403)
    env = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["RAY_AUTH_MODE"] = "disabled"
    proc = head.ray_cli("job", "list", "--address", head.address, env=env)
    assert proc.returncode != 0
    assert "Authentication" in proc.stdout + proc.stderr
    assert isinstance(head.api("/api/jobs/"), list)


def test_job_runs_uploaded_code_in_the_venv(head):
    """The working dir is uploaded without .venv/data, its code is what runs, env vars arrive."""
    probe = (
        "import os, sys, dipro; "
        "print('PROBE', os.path.isdir('.venv'), os.path.isdir('demo_output'), "
        "os.path.realpath(dipro.__file__).startswith(os.getcwd()), "
        "sys.prefix, os.environ['PYTHONUNBUFFERED'], os.environ['DIPRO_TEST_MARK'])"
    )
    job = sid("probe")
    proc = head.submit(job, ["python", "-c", probe], runtime_env(DIPRO_TEST_MARK="m42"), cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert head.job_info(job)["status"] == "SUCCEEDED"
    line = next(l for l in head.logs(job).splitlines() if l.startswith("PROBE"))
    venv, data, uploaded, prefix, unbuffered, mark = line.split()[1:]
    assert (venv, data, uploaded) == ("False", "False", "True"), line
    assert Path(prefix).resolve() == Path(sys.prefix).resolve(), line  # the venv running these tests
    assert (unbuffered, mark) == ("1", "m42")


def test_failing_job_is_failed_with_its_error_in_the_logs(head):
    job = sid("fail")
    entry = ["python", "-c", "raise SystemExit('dipro-cluster-test: deliberate failure 7d1f')"]
    proc = head.submit(job, entry, runtime_env(), cwd=REPO)
    assert proc.returncode != 0
    info = head.job_info(job)
    assert info["status"] == "FAILED", info
    assert "deliberate failure 7d1f" in head.logs(job)
