"""The cluster job path, for real: a token-authenticated Ray head on 127.0.0.1
and the real ``ray job submit`` / ``ray job logs`` clients.

What a user does on a cluster (cluster/README.md) is done here against a local
head: the runtime env is cluster/runtime_env.yaml as committed (the repository
uploaded as the working dir, venv and data excluded) plus the MLflow URI; the
entrypoints are the project's own commands.  One head serves the whole module
and is stopped by its finalizer (see tests/ray_head.py for why not ``ray stop``).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.error
import uuid
from pathlib import Path

import pytest
import yaml

from ray_head import RayHead

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """A tiny synthetic cohort, prepared and sharded once (64 px images, the demo config's 32 px crops)."""
    from data_sharding.manifest import ShardSettings
    from data_sharding.prepare import PrepareOptions, prepare
    from data_sharding.readers import resolve_roots
    from data_sharding.shard_writer import write_shards
    from data_sharding.synth import generate
    from dipro.config import load_config

    root = tmp_path_factory.mktemp("cluster-cohort")
    generate(root / "raw", patients=40, seed=5, image_size=64, progress=False)
    prepare(resolve_roots(str(root / "raw"), None, None, None), root / "processed", PrepareOptions(progress=False))
    crop = load_config(REPO / "configs" / "demo.yaml").model.crop_size
    write_shards(root / "processed", root / "shards", settings=ShardSettings(crop_size=crop), workers=1,
                 progress=False)
    return root


@pytest.fixture(scope="module")
def head():
    # What the jobs need, one job at a time: two 1-CPU training workers (then one 1-CPU evaluation task),
    # or 1-CPU shard tasks; the job drivers take none. The CI machine has 2 cores.
    h = RayHead(num_cpus=2)
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




def test_failing_job_through_submit_sh_is_failed_with_its_error_in_the_logs(head):
    """cluster/submit.sh as a user runs it: the runtime env it sends, a job that fails, its error in the logs."""
    job = sid("fail")
    env = dict(head.env, RAY_ADDRESS=head.address, MLFLOW_TRACKING_URI="http://127.0.0.1:9/unused",
               SUBMIT_FLAGS=f"--submission-id {job}")
    proc = subprocess.run([str(REPO / "cluster" / "submit.sh"), "train", "--config", "configs/no-such-config.yaml"],
                          env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode != 0
    info = head.job_info(job)
    assert info["status"] == "FAILED", info
    assert info["entrypoint"] == "python -m dipro train --config configs/no-such-config.yaml"
    sent = info["runtime_env"]
    assert sent["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9/unused"
    assert ".venv/" in sent["excludes"]
    logs = head.logs(job)
    assert "no-such-config.yaml" in logs and "not found" in logs, logs
    assert "Traceback" not in logs  # a user error is one line


def test_error_on_a_training_rank_is_one_line_in_the_job_logs(head, cohort, tmp_path):
    """A user error raised inside a Ray Train worker of a `ray job submit` job: `dipro train` exits 2,
    the job is FAILED and its logs end with the same one line as any user error, naming the rank, and
    the path of the run log that holds the full trace."""
    import json

    from data_sharding.manifest import read_manifest, write_manifest

    shards = tmp_path / "shards"
    shutil.copytree(cohort / "shards", shards)
    manifest = read_manifest(shards)
    for r in manifest.records:  # the manifest claims 64-px crops, the tars hold 32-px ones
        r.settings = json.dumps({**json.loads(r.settings), "crop_size": 64}, sort_keys=True, separators=(",", ":"))
    write_manifest(shards, manifest)
    job = sid("rankerr")
    entry = ["python", "-m", "dipro", "train", "--config", "configs/demo.yaml", f"data.shards={shards}",
             "model.crop_size=64", f"trainer.storage_path={tmp_path / 'runs'}", "trainer.max_epochs=1",
             "tracking.enabled=false", "trainer.run_name=rank-error"]
    proc = head.submit(job, entry, runtime_env(), cwd=REPO, timeout=600)
    logs = head.logs(job)
    assert proc.returncode != 0 and head.job_info(job)["status"] == "FAILED", logs[-3000:]
    errors = [line for line in logs.splitlines() if line.startswith("dipro train: error: ")]
    assert len(errors) == 1 and errors[0].endswith("(rank 0)"), logs[-3000:]
    assert logs.strip().splitlines()[-1] == errors[0]  # the last line
    assert "crops.npy has crop size 32, the manifest says 64" in errors[0]
    assert "exit code 2" in head.job_info(job).get("message", "")
    assert "dipro/cli.py" not in logs  # no driver traceback
    log = tmp_path / "runs" / "rank-error" / "train.log"
    assert f"full trace in {log}" in logs
    assert "dipro/data/pipeline.py" in log.read_text()  # the frame where the rank found it


def test_shard_regeneration_job(head, cohort, tmp_path):
    """`dipro shards regenerate` as a job: Ray tasks on this cluster rebuild only the broken shard."""
    from data_sharding.manifest import read_manifest, sha256_file
    from data_sharding.verify import verify_shards

    shards = tmp_path / "shards"
    shutil.copytree(cohort / "shards", shards)
    records = sorted(read_manifest(shards).records, key=lambda r: r.path)
    broken, intact = records[0], records[-1]
    data = (shards / broken.path).read_bytes()
    (shards / broken.path).write_bytes(data[: len(data) // 2])  # truncated mid-sample
    intact_mtime = (shards / intact.path).stat().st_mtime_ns

    job = sid("regen")
    entry = ["python", "-m", "dipro", "shards", "regenerate", "--processed", str(cohort / "processed"),
             "--out", str(shards)]
    proc = head.submit(job, entry, runtime_env(), cwd=REPO)
    logs = head.logs(job)
    assert proc.returncode == 0 and head.job_info(job)["status"] == "SUCCEEDED", logs
    assert "Started a local Ray instance" not in logs  # the tasks ran on the cluster the job was given
    assert "1 rebuilt" in logs and f"rebuilt  {broken.path}" in logs

    after = {r.path: r for r in read_manifest(shards).records}
    assert set(after) == {r.path for r in records}
    assert after[broken.path].sha256 == sha256_file(shards / broken.path) == broken.sha256  # deterministic rebuild
    assert (shards / intact.path).stat().st_mtime_ns == intact_mtime
    assert verify_shards(shards) == []


def test_two_worker_training_job(head, cohort, tmp_path):
    """`dipro train` with the demo config and 2 DeepSpeed workers as a job: one MLflow run, a registered model.

    ZeRO-2 in bf16 with the compiled step (traced before the engine wraps the module; evaluation eager):
    one ZeRO optimizer partition per rank in the checkpoint, fp32 weights in model.pt, and the best
    checkpoint evaluates in bf16 in this process."""
    import torch
    from mlflow import MlflowClient

    from dipro.tracking.provenance import data_fingerprint
    from dipro.train import checkpoint as ck
    from dipro.train.evaluate import evaluate_checkpoint

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    run_name = f"cluster-{uuid.uuid4().hex[:6]}"
    job = sid("train")
    entry = ["python", "-m", "dipro", "train", "--config", "configs/demo.yaml",
             f"data.shards={cohort / 'shards'}", f"trainer.storage_path={tmp_path / 'runs'}",
             "trainer.num_workers=2", "trainer.strategy=deepspeed", "trainer.zero_stage=2", "trainer.precision=bf16",
             "model.compile=true", "model.compile_backend=eager", "trainer.max_epochs=1", f"trainer.run_name={run_name}"]
    proc = head.submit(job, entry, runtime_env(MLFLOW_TRACKING_URI=uri), cwd=REPO, timeout=900)
    logs = head.logs(job)
    assert proc.returncode == 0 and head.job_info(job)["status"] == "SUCCEEDED", logs[-5000:]
    assert "micro batch 4 x workers 2 x accumulation 1" in logs
    assert "[dipro train rank 1] world rank 1 of 2" in logs  # a second Ray Train worker ran
    best = tmp_path / "runs" / run_name / "best"
    last = sorted((tmp_path / "runs" / run_name).glob("checkpoint_*"))[-1]
    assert len(list((last / "deepspeed" / "state").glob("*optim_states.pt"))) == 2  # one ZeRO partition per rank
    weights = torch.load(best / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    assert ck.load_model(best)[1].trainer.strategy == "deepspeed"
    res = evaluate_checkpoint(best, "val", precision="bf16")
    assert res.num_samples > 0 and torch.isfinite(torch.tensor(res.metrics["loss"]))

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("dipro")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.num_workers"] == "2"
    assert run.data.tags["data.fingerprint"] == data_fingerprint(cohort / "shards")
    assert any(k.startswith("val/") for k in run.data.metrics)
    versions = client.search_model_versions("name = 'dipro-mortality'")
    assert [v.run_id for v in versions] == [run.info.run_id]
