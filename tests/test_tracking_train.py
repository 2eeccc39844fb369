"""End to end: a 2-worker Ray Train run with a SIGKILLed worker, tracked on a real `mlflow server`.

The restarted worker group resumes from the last checkpoint before the kill (steps, epochs and
checkpoints as if nothing happened), and there is one MLflow run (the retried worker group
reattaches to it), with the params, tags, per-step and per-epoch metrics, artifacts and the
registered version of issue 6.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
import processed_fixture  # noqa: E402

from mlflow_server import Server  # noqa: E402

from dipro.config import load_config  # noqa: E402
from dipro.train.checkpoint import read_meta  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return processed_fixture.make_training_shards(tmp_path_factory.mktemp("track_train_shards"))


def test_two_worker_run_with_worker_failure_is_one_tracked_run(shards, tmp_path, monkeypatch):
    import ray
    from mlflow import MlflowClient

    from dipro.tracking.provenance import data_fingerprint
    from dipro.train import run_training

    server = Server(tmp_path)
    server.start()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        marker = tmp_path / "killed"
        monkeypatch.setenv("DIPRO_FAULT_INJECT", json.dumps({"kill_rank": 1, "kill_at_step": 5, "marker": str(marker)}))
        cfg = load_config(ROOT / "configs" / "demo.yaml", [
            "task=length_of_stay", f"data.shards={shards}", f"trainer.storage_path={tmp_path / 'runs'}",
            f"tracking.uri={server.uri}", "tracking.experiment=e2e", "data.num_loader_workers=0",
            "data.augment=false", "data.shuffle_buffer=0", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
            "trainer.num_workers=2", "data.batch_size=2", "trainer.max_failures=1",
            "trainer.checkpoint_every_n_steps=2", "trainer.num_to_keep=10"])
        result = run_training(cfg)
    finally:
        ray.shutdown()
    # The worker group was really restarted: rank 1 died at step 5, the 2nd step of epoch 1; the last
    # checkpoint before it is step 4 (mid-epoch): the restarted group continues from there, so the run
    # ends with 2 epochs, 6 steps, each epoch once.
    assert marker.read_text().startswith("killed rank 1 at step 5")
    assert result.epochs_completed == 2 and result.global_step == 6
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert sorted(p.name for p in result.run_dir.glob("checkpoint_*") if p.is_dir()) == [
        "checkpoint_s00000002", "checkpoint_s00000003_epoch0000", "checkpoint_s00000004", "checkpoint_s00000006_epoch0001"]
    assert read_meta(result.last_checkpoint)["epoch"] == 2
    try:
        client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        exp = client.get_experiment_by_name("e2e")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1 and runs[0].info.run_id == result.mlflow_run_id
        run = runs[0]
        assert run.info.status == "FINISHED"
        p, t, m = run.data.params, run.data.tags, run.data.metrics
        assert (p["workers"], p["strategy"], p["precision"], p["seed"]) == ("2", "ddp", "fp32", str(cfg.seed))
        assert p["effective_batch"] == str(cfg.effective_batch_size) and p["data.shards"] == str(shards)
        assert t["data.fingerprint"] == data_fingerprint(shards)
        assert len(t["git.commit"]) == 40 and t["version.ray"] and t["version.deepspeed"] and t["hardware.cpu_count"]
        for key in ("train/total", "train/lr", "train/samples_per_s", "val/accuracy", "test/accuracy",
                    "data/storage_retries", "data/epoch_storage_retries", "data/epoch_cache_hits"):
            assert key in m, key
        assert m["data/epoch_storage_retries"] == 0.0 and m["data/epoch_storage_requests"] == 0.0  # local shards
        steps = sorted({x.step for x in client.get_metric_history(run.info.run_id, "train/total")})
        assert steps[-1] == result.global_step and len(steps) >= 4
        assert len({x.step for x in client.get_metric_history(run.info.run_id, "val/accuracy")}) == 2  # per epoch
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "summary.json", "eval"} <= arts  # the model is an MLflow 3 LoggedModel of the run
        evals = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run.info.run_id, "eval/test")}
        assert {"roc.png", "pr.png", "confusion.png", "region_attention.png", "metrics.json"} <= evals
        versions = client.search_model_versions("name = 'dipro-length_of_stay'")
        assert [v.run_id for v in versions] == [run.info.run_id]
        assert versions[0].tags["data.fingerprint"] == t["data.fingerprint"]
    finally:
        server.stop()
