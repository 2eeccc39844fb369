"""Errors around training: driver-side preflight, errors raised on a Ray Train rank, run names in use.

Preflight and run-name tests need no Ray (the driver stops before `ray.init`); the tests
marked ``slow`` start a local Ray (2 CPUs, 127.0.0.1) and train the tiny demo model on the
training fixture's 32-px shards (tests/processed_fixture.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import processed_fixture
from data_sharding.errors import ConfigError, DataError, UserError
from data_sharding.manifest import read_manifest, write_manifest
from dipro import cli
from dipro.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """24 stays, 32-px crops, at most 4 samples per shard (12 train samples)."""
    return processed_fixture.make_training_shards(tmp_path_factory.mktemp("fault_shards"))


def overrides(shards: Path, storage: Path, *extra: str) -> list[str]:
    return ["task=length_of_stay", f"data.shards={shards}", f"trainer.storage_path={storage}",
            "tracking.enabled=false", "data.num_loader_workers=0", "data.augment=false", "data.shuffle_buffer=0",
            "trainer.max_epochs=1", *extra]


def cfg_for(shards: Path, storage: Path, *extra: str):
    return load_config(DEMO, overrides(shards, storage, *extra))


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def claim_manifest_crop(shards: Path, crop: int) -> None:
    """Rewrite the manifest so it claims ``crop``-px crops while the tars hold the old ones
    (what a shard directory assembled from two builds looks like): only a rank reading the
    samples can tell."""
    m = read_manifest(shards)
    for r in m.records:
        settings = json.loads(r.settings)
        settings["crop_size"] = crop
        r.settings = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    write_manifest(shards, m)


# ----------------------------------------------------------------------------- preflight (no Ray)

def test_preflight_refuses_32px_shards_for_a_64px_model_before_ray(shards, tmp_path, capsys):
    import ray

    storage = tmp_path / "runs"
    rc = cli.main(["train", "--config", str(DEMO), *overrides(shards, storage, "model.crop_size=64")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{shards / 'manifest.parquet'}: mortality_los/train shards hold 32-px crops but model.crop_size=64" in err
    assert "set model.crop_size=32" in err and "--crop-size 64" in err
    assert not ray.is_initialized() and not storage.exists()  # nothing started, no run claimed


def test_preflight_label_stats_and_ehr_features(shards, tmp_path):
    from dipro.train.preflight import check_shards

    assert check_shards(cfg_for(shards, tmp_path)) == 12 // 4  # 12 train samples, micro batches of 4, 1 worker
    bad = copy_shards(shards, tmp_path / "no_stats")
    (bad / "label_stats.json").unlink()
    with pytest.raises(DataError, match=r"label_stats\.json not found"):
        check_shards(cfg_for(bad, tmp_path))
    stats = json.loads((shards / "label_stats.json").read_text())
    del stats["disease_progression"]  # the PAE class weights of every task come from these counts
    (bad / "label_stats.json").write_text(json.dumps(stats))
    with pytest.raises(DataError, match=r"label_stats\.json: .*missing key 'disease_progression\.task'"):
        check_shards(cfg_for(bad, tmp_path))
    (bad / "label_stats.json").write_text((shards / "label_stats.json").read_text())
    ehr = json.loads((bad / "ehr_stats.json").read_text())
    ehr["mean"].pop("heart_rate")
    (bad / "ehr_stats.json").write_text(json.dumps(ehr))
    with pytest.raises(DataError, match=r"ehr_stats\.json: the shards carry 37 EHR features, the model reads 38 "
                                        r"\(missing heart_rate\)"):
        check_shards(cfg_for(bad, tmp_path))


def test_preflight_one_optimizer_step_per_rank(shards, tmp_path):
    from dipro.train.preflight import check_shards

    # 12 train samples: 2 x 3 x 2 = 12 fit exactly, 2 x 4 x 2 = 16 do not
    assert check_shards(cfg_for(shards, tmp_path, "data.batch_size=2", "optim.grad_accum=3",
                                "trainer.num_workers=2")) == 3
    with pytest.raises(ConfigError, match=r"12 training samples cannot fill one optimizer step on each of 2 "
                                          r"worker\(s\): .*batch_size 2 x optim.grad_accum 4 x trainer.num_workers 2 = 16"):
        check_shards(cfg_for(shards, tmp_path, "data.batch_size=2", "optim.grad_accum=4", "trainer.num_workers=2"))


def test_gpu_asked_for_but_the_cluster_has_none(shards, tmp_path, monkeypatch):
    import ray

    from dipro.train.launcher import check_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(ConfigError, match=r"trainer asks for 2 GPUs but the cluster has 0"):
        check_resources(cfg_for(shards, tmp_path, "trainer.use_gpu=true", "trainer.num_workers=2"), True)


# ----------------------------------------------------------------------------- run names

HOLDER = """
    import sys
    from dipro.train import rundir
    rundir.claim(sys.argv[1], sys.argv[2])
"""


def test_a_second_run_with_the_same_name_refuses_naming_the_first(shards, tmp_path, capsys):
    import socket

    storage = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(HOLDER), str(storage), "same-name"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first_pid = json.loads((storage / "same-name" / "run.json").read_text())["pid"]
    rc = cli.main(["train", "--config", str(DEMO), *overrides(shards, storage, "trainer.run_name=same-name")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"run 'same-name' already exists under {storage} (started by pid {first_pid} on {socket.gethostname()}" in err
    assert "Ray would silently resume it" in err
    assert sorted(p.name for p in (storage / "same-name").iterdir()) == ["run.json"]  # the first run's dir untouched


def test_claim_is_exclusive_and_released_when_nothing_ran(tmp_path):
    from dipro.train import rundir

    run_dir = rundir.claim(tmp_path, "r")
    with pytest.raises(ConfigError, match=f"started by pid {os.getpid()}"):
        rundir.claim(tmp_path, "r")
    rundir.RunLog(run_dir).write("[dipro train] something")
    rundir.release(run_dir)
    assert not run_dir.exists()
    run_dir = rundir.claim(tmp_path, "r")
    (run_dir / "checkpoint_s00000001").mkdir()
    rundir.release(run_dir)  # it trained: kept
    assert run_dir.is_dir()


# ----------------------------------------------------------------------------- rank errors (no Ray)

def test_rank_error_is_one_line_with_the_rank_and_keeps_the_trace():
    from ray.train import WorkerGroupError

    from dipro.train import failures

    def fail_on_rank(rank: int) -> DataError:
        try:
            raise DataError(f"shard x.tar: crops.npy has crop size 32, the manifest says 64 [{rank}]")
        except DataError as exc:
            return failures.mark_rank_error(exc, rank)

    err = WorkerGroupError("snippets", {1: fail_on_rank(1), 0: RuntimeError("a bug")})
    found = failures.rank_error(err)
    assert found.one_line() == "shard x.tar: crops.npy has crop size 32, the manifest says 64 [1] (rank 1)"
    assert "Traceback" in found.traces[1] and "fail_on_rank" in found.traces[1]
    assert failures.rank_error(WorkerGroupError("x", {0: RuntimeError("a bug")})) is None
    from_loader_worker = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most "
                                   "recent call last):\n  File \"x.py\", line 1, in f\n"
                                   "data_sharding.errors.DataError: 3 of 4 samples were corrupt\n")
    assert failures.rank_error(WorkerGroupError("x", {0: from_loader_worker})).one_line() == \
        "3 of 4 samples were corrupt (rank 0)"
    tags = failures.failure_tags("corrupt sample 's123_4' in shard a.tar", found)
    assert tags == {"failure.reason": "corrupt sample 's<stay>_<row>' in shard a.tar", "failure.rank": "1"}


def test_a_user_error_on_a_rank_is_not_retried():
    """The controller is about to restart a group that failed with a user error: the callback ends the run,
    and the driver still finds the rank's one line; a crash keeps its retry."""
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState

    from dipro.train import failures

    try:
        raise DataError("shard x.tar: crops.npy has crop size 32, the manifest says 64")
    except DataError as exc:
        user = failures.mark_rank_error(exc, 1)
    stop = failures.StopOnUserError()
    stop.after_controller_state_update(RunningState(), RunningState())  # nothing failed: nothing happens
    crashed = RestartingState(training_failed_error=WorkerGroupError("x", {0: RuntimeError("segfault")}))
    stop.after_controller_state_update(RunningState(), crashed)  # a crash: Ray's retry goes ahead
    restarting = RestartingState(training_failed_error=WorkerGroupError("x", {1: user}))
    with pytest.raises(failures.UserErrorOnRank) as stopped:
        stop.after_controller_state_update(RunningState(), restarting)
    fit_error = ControllerError(stopped.value)  # what trainer.fit() raises for a controller callback's error
    found = failures.rank_error(fit_error)
    assert found.one_line() == "shard x.tar: crops.npy has crop size 32, the manifest says 64 (rank 1)"
    assert "Traceback" in found.traces[1]


# ----------------------------------------------------------------------------- on a rank (Ray)

@pytest.fixture(scope="module")
def ray_local():
    """A local Ray whose workers have (dummy) S3 credentials in their environment, as a node's IAM role
    gives them, but no endpoint: a run on the test S3 server names it with ``storage.s3_endpoint``."""
    import ray
    from object_store import ACCESS_KEY, SECRET_KEY

    os.environ.pop("RAY_ADDRESS", None)
    with pytest.MonkeyPatch.context() as mp:  # the raylet copies this environment at start
        for name, value in (("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            mp.setenv(name, value)
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_error_raised_on_a_rank_is_one_line_and_the_run_is_failed(shards, tmp_path, ray_local):
    """Preflight passes (the manifest says 64 px), the rank finds 32-px crops in every sample."""
    from mlflow import MlflowClient

    from dipro.train import run_training

    lying = copy_shards(shards, tmp_path / "lying")
    claim_manifest_crop(lying, 64)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = cfg_for(lying, tmp_path / "runs", "model.crop_size=64", "tracking.enabled=true", f"tracking.uri={uri}",
                  "tracking.register=false", "trainer.run_name=rank-fail", "trainer.max_failures=2")
    with pytest.raises(UserError) as exc:
        run_training(cfg)
    msg = str(exc.value)
    assert "\n" not in msg and msg.endswith("(rank 0)"), msg
    assert "without one valid sample" in msg and "crops.npy has crop size 32, the manifest says 64" in msg
    log = (tmp_path / "runs" / "rank-fail" / "train.log").read_text()
    assert f"FAILED: {msg}" in log
    assert "--- rank 0 ---" in log and "Traceback (most recent call last)" in log
    assert "dipro/data/pipeline.py" in log  # the frame where the rank found it: the full trace is kept
    # trainer.max_failures=2, yet the first failure ended the run: a controller callback (StopOnUserError)
    # stopped the restart, where two retries would have ended in a WorkerGroupError
    assert "ControllerError: Training failed due to controller error" in log
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("dipro").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["failure.rank"] == "0" and "crop size 32" in run.data.tags["failure.reason"]


@pytest.mark.slow
def test_truncated_last_checkpoint_on_a_bucket_resumes_from_previous_only_when_asked(shards, tmp_path, ray_local,
                                                                                      s3_server, s3_bucket, monkeypatch):
    """The run directory on S3 (trainer.storage_path=s3://..., the endpoint from storage.s3_endpoint in the
    driver and the workers): its last checkpoint's train_state.pt object cut short is refused with the line
    a local file gets, and --resume RUN@previous continues from the checkpoint before it, read from the bucket."""
    import re

    from data_sharding import storage
    from dipro.train import checkpoint as ck
    from dipro.train import run_training

    monkeypatch.setenv("DIPRO_S3_ENDPOINT", s3_server.endpoint)  # (undone afterwards: storage.configure sets it)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the config key says where the server is
    runs = f"{s3_bucket}/runs"
    where = f"storage.s3_endpoint={s3_server.endpoint}"
    first = run_training(cfg_for(shards, runs, "trainer.run_name=base", "trainer.max_epochs=2",
                                 "trainer.num_to_keep=5", where))
    assert first.run_dir == storage.resolve(f"{runs}/base")

    def checkpoints(run_dir) -> list[str]:
        return sorted({o.path.split("/")[0] for o in run_dir.list() if o.path.startswith("checkpoint_s")})

    names = checkpoints(first.run_dir)
    assert names == ["checkpoint_s00000003_epoch0000", "checkpoint_s00000006_epoch0001"]
    state = first.run_dir / names[-1] / "train_state.pt"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    cfg = cfg_for(shards, runs, "trainer.max_epochs=3", "trainer.num_to_keep=5", where)
    with pytest.raises(UserError, match=rf"{re.escape(str(state))} is truncated or damaged: .* --resume base@previous"):
        run_training(cfg, resume="base")
    r = run_training(cfg, resume="base@previous")
    assert r.run_name.startswith("base-resumed-")
    # from the end of epoch 0 (step 3): epochs 1 and 2 again, 9 steps in all
    assert r.global_step == 9 and r.epochs_completed == 3
    assert checkpoints(r.run_dir)[0] == "checkpoint_s00000006_epoch0001"
    assert ck.checkpoint_problem(r.last_checkpoint) is None
    assert "resuming base@previous from " + f"{runs}/base/checkpoint_s00000003_epoch0000" in (
        r.run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_run_on_gcs_checkpoints_there_and_resumes_from_it(shards, ray_local, gcs_bucket):
    """Ray Train's storage on ``gs://`` (fake-gcs-server on 127.0.0.1; the workers find it through
    STORAGE_EMULATOR_HOST, as the session's environment gives it to the local Ray): the run claim, the
    checkpoints of the rank, ``best/`` and ``summary.json`` land in the bucket and ``--resume RUN``
    continues from the last checkpoint read back from there."""
    from data_sharding import storage
    from dipro.train import checkpoint as ck
    from dipro.train import run_training

    runs = f"{gcs_bucket}/runs"
    first = run_training(cfg_for(shards, runs, "trainer.run_name=gcs"))
    assert first.run_dir == storage.resolve(f"{runs}/gcs") and first.global_step == 3
    names = {o.path.split("/")[0] for o in first.run_dir.list()}
    assert {"checkpoint_s00000003_epoch0000", "best", "summary.json", "train.log"} <= names, names
    assert ck.checkpoint_problem(first.last_checkpoint) is None
    r = run_training(cfg_for(shards, runs, "trainer.max_epochs=2"), resume="gcs")
    assert r.global_step == 6 and r.epochs_completed == 2
    assert str(r.run_dir).startswith(f"{runs}/gcs-resumed-")
    assert f"resuming gcs from {runs}/gcs/checkpoint_s00000003_epoch0000" in (r.run_dir / "train.log").read_text()
