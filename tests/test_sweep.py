"""``dipro sweep`` end to end: two concurrent trials on a token-authenticated Ray head (4 logical CPUs, 1 worker
each), tracked on an ``mlflow server`` backed by a real PostgreSQL; the driver SIGKILLed while both trials
are held mid-training just after their first checkpoint; ``--resume`` continues both from that checkpoint in
their own run directories and MLflow runs; a second ``--resume`` runs nothing.  A grid value that makes no
valid config is a FAILED row at once; a trial that fails inside Tune is a FAILED record (no Ray needed to
check that: its preflight refuses before any worker starts).

Shards: tests/processed_fixture.py (12 training, 6 val, 6 test stays, 32-px crops): length of stay, one epoch
of 3 optimizer steps, a checkpoint after every step.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

import processed_fixture  # noqa: E402
from helpers import REPO, config_path, repo_env  # noqa: E402
from mlflow_server import Postgres, Server  # noqa: E402
from ray_head import RayHead  # noqa: E402

from dipro.sweep import record as rec  # noqa: E402

SWEEP = "swp"
TRIALS = ("a00-s23", "a01-s23")  # model.dropout=0.0 (baseline), 0.2
INVALID = "a02-s23"  # model.dropout=1.5


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return processed_fixture.make_training_shards(tmp_path_factory.mktemp("sweep_shards"))


def _common(shards: Path, uri: str) -> list[str]:
    return ["task=length_of_stay", f"data.shards={shards}", "trainer.storage_path=runs", f"tracking.uri={uri}",
            "tracking.experiment=sweep-test", "tracking.register=false", "tracking.system_metrics_interval_s=1",
            "data.num_loader_workers=0", "data.augment=false", "data.shuffle_buffer=0", "trainer.max_epochs=1",
            "trainer.checkpoint_every_n_steps=1", "trainer.log_every_n_steps=1", "trainer.schedule_timeout_s=120"]


def _dipro(*args: str) -> list[str]:
    return [sys.executable, "-m", "dipro", *args]


def _wait_for(predicate, what: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep driver exited {proc.returncode} before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout_s:.0f}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def test_trial_failing_in_tune_is_a_failed_record(shards, tmp_path):
    """The trainable's failure path: the preflight refuses (batch above the training samples) before Ray is
    needed; the record says FAILED with the one-line reason, and the trial counts its attempt."""
    from dipro.config import load_config, to_dict
    from dipro.sweep.trial import execute

    cfg = load_config(config_path("demo"), [f"data.shards={shards}", f"trainer.storage_path={tmp_path}",
                                            "tracking.enabled=false", "data.batch_size=64",
                                            "trainer.run_name=sw-a00-s1"])
    spec = {"key": "a00-s1", "arm": 0, "seed": 1, "run_name": "sw-a00-s1", "owner": "sweep:sw/a00-s1",
            "sweep_dir": str(tmp_path), "cfg": to_dict(cfg), "tracker": None, "faults": None}
    record = execute(spec)
    assert record.status == rec.FAILED and record.attempts == 1 and "\n" not in record.reason
    assert "data.batch_size" in record.reason
    assert rec.read_record(tmp_path, "a00-s1").status == rec.FAILED and record.history


def test_concurrent_trials_survive_a_killed_driver_and_appear_once_in_mlflow(shards, tmp_path):
    from mlflow import MlflowClient

    held = tmp_path / "held"
    pg, server, head = Postgres(), None, RayHead(num_cpus=4)
    try:
        server = Server(tmp_path, backend_uri=pg.start())
        server.start()
        head.start()
        env = repo_env(**{k: v for k, v in head.env.items() if k.startswith(("RAY_", "PATH"))},
                       RAY_ADDRESS=head.gcs_address)
        # each trial's rank 0 waits after step 2 (its step-1 checkpoint written), once per run
        hold = json.dumps({"hold_at_step": 2, "hold_file": str(held), "hold_per_run": True, "hold_s": 600})
        log = tmp_path / "sweep-1.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(_dipro("sweep", "--config", str(config_path("demo")), "--grid",
                                           "model.dropout=0.0,0.2,1.5", "--seeds", "23", "--name", SWEEP,
                                           "--max-concurrent", "2", *_common(shards, server.uri)),
                                    env={**env, "DIPRO_FAULT_INJECT": hold}, cwd=tmp_path, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        root = tmp_path / "runs" / SWEEP
        try:
            # Both trials are inside their training loop at once: their training intervals overlap.
            _wait_for(lambda: all(Path(f"{held}.{SWEEP}-{k}.rank0").exists() for k in TRIALS),
                      "two trials held mid-training", 360, proc, log)
            for k in TRIALS:
                assert (root / f"{SWEEP}-{k}" / "checkpoint_s00000001").is_dir()
                assert rec.read_record(root, k).status == rec.RUNNING
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver (and anything it forked) dies at once
            proc.wait(30)
        assert rec.read_record(root, INVALID).status == rec.FAILED

        first = _run(_dipro("sweep", "--resume", SWEEP, "trainer.storage_path=runs"), env, tmp_path)
        assert "FAILED a02-s23 (model.dropout=1.5, seed 23): model.dropout must be in [0, 1)" in first
        assert "model.dropout=0.2 - model.dropout=0.0" in first  # the paired difference vs the baseline
        for k in TRIALS:
            r = rec.read_record(root, k)
            assert (r.status, r.attempts, r.global_step, r.epochs_completed) == (rec.FINISHED, 2, 3, 1), r
        sweep_log = (root / rec.LOG).read_text()
        for k in TRIALS:  # each continued from its own step-1 checkpoint
            assert f"{SWEEP}-{k}/checkpoint_s00000001: epoch 0, step 1" in sweep_log
        from dipro.sweep.driver import run_sweep

        again = run_sweep(None, resume=SWEEP, storage=str(tmp_path / "runs"))  # in process: nothing to start
        assert again.concurrency == 0 and again.report.table in first  # the same tables (seeded bootstrap)
        assert sorted(p.name for p in root.glob("tune-*")) == ["tune-1", "tune-2"]  # nothing was run again
        assert all(rec.read_record(root, k).attempts == 2 for k in TRIALS)

        client = MlflowClient(tracking_uri=server.uri)
        exp = client.get_experiment_by_name("sweep-test")
        runs = client.search_runs([exp.experiment_id])
        by_role = {}
        for run in runs:
            by_role.setdefault(run.data.tags.get("dipro.sweep.role"), []).append(run)
        assert len(runs) == 4 and len(by_role["parent"]) == 1 and len(by_role["trial"]) == 3  # each once
        parent = by_role["parent"][0]
        assert parent.info.status == "FINISHED" and parent.data.tags["sweep.failed_trials"] == "1"
        assert {"comparison.png", "sweep_table.txt", "sweep_results.json"} <= {
            a.path for a in client.list_artifacts(parent.info.run_id)}
        assert "arm01/accuracy_delta_low" in parent.data.metrics
        children = {r.data.tags["dipro.sweep.trial"]: r for r in by_role["trial"]}
        assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
        assert children[INVALID].info.status == "FAILED"
        assert "model.dropout must be in [0, 1)" in children[INVALID].data.tags["failure.reason"]
        for k in TRIALS:
            run = children[k]
            assert run.info.status == "FINISHED" and rec.read_record(root, k).mlflow_run_id == run.info.run_id
            steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/total")}
            assert steps == {1, 2, 3}, (k, steps)  # every step, the one redone after the kill included
            assert "test/accuracy" in run.data.metrics and "val/accuracy" in run.data.metrics
            assert any(m.startswith("system/cpu_utilization") for m in run.data.metrics), run.data.metrics.keys()
        results = json.loads((root / "results.json").read_text())
        assert [a["label"] for a in results["arms"]] == ["model.dropout=0.0", "model.dropout=0.2", "model.dropout=1.5"]
        assert results["arms"][1]["vs_baseline"]["accuracy"]["resamples"] == 1000
    finally:
        head.stop()
        if server is not None:
            server.stop()
        pg.stop()


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout
