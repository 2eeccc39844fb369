"""End to end on object storage: a 2-worker Ray Train run with a SIGKILLed worker, its run directory on
an S3 bucket (moto on 127.0.0.1), tracked on a real `mlflow server` in proxy mode whose artifacts are
in the same bucket; then evaluate, register, promote and predict from the bucket.

The restarted worker group resumes from the last checkpoint before the kill, read back from the
bucket (steps, epochs and checkpoints as if nothing happened), and there is one MLflow run (the
retried worker group reattaches to it), with the params, tags, per-step and per-epoch metrics,
figures and the registered version of issue 6.  Only the MLflow server holds bucket credentials for
the artifacts: `dipro predict --model models:/...@champion` runs without any.

The shards are on the bucket too (cut there by `dipro shard`'s writer from processed tables in the bucket,
byte for byte the local build's) and stream
into the loaders; everything the training run writes (run.json, train.log, checkpoints, best/,
summary.json) is on the bucket.  Only the champion's prediction, by a client without bucket
credentials, reads a local copy of the same shards.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
import processed_fixture  # noqa: E402

from mlflow_server import Server  # noqa: E402

from data_sharding import storage  # noqa: E402
from dipro import cli  # noqa: E402
from dipro.config import load_config  # noqa: E402
from dipro.train.checkpoint import BEST_POINTER, read_meta  # noqa: E402

BUCKET_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return processed_fixture.make_training_shards(tmp_path_factory.mktemp("track_train_shards"))


def read_parquet(uri: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(storage.resolve(uri).read_bytes()))


def test_two_worker_run_on_a_bucket_with_worker_failure_is_one_tracked_run(shards, tmp_path, s3_bucket, monkeypatch,
                                                                            capsys):
    import ray
    from mlflow import MlflowClient

    from dipro.tracking.provenance import data_fingerprint
    from dipro.train import run_training

    from data_sharding.manifest import ShardSettings, logical_path, read_manifest
    from data_sharding.shard_writer import write_shards
    from data_sharding.verify import verify_shards

    # the shards are cut in the bucket from the processed tables in the bucket, and are the local build's bytes
    storage.resolve(f"{s3_bucket}/processed").upload_dir(shards.parent / "processed")
    bucket_shards = f"{s3_bucket}/shards"
    write_shards(f"{s3_bucket}/processed", bucket_shards, settings=ShardSettings(crop_size=32, max_samples_per_shard=4),
                 workers=1, progress=False)
    assert verify_shards(bucket_shards) == []
    local = {(r.logical, r.sha256, r.offsets) for r in read_manifest(shards).records}
    assert {(r.logical, r.sha256, r.offsets) for r in read_manifest(bucket_shards).records} == local
    server = Server(tmp_path, artifacts_destination=f"{s3_bucket}/mlflow", env=dict(os.environ))  # proxy mode
    server.start()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        marker = tmp_path / "killed"
        monkeypatch.setenv("DIPRO_FAULT_INJECT", json.dumps({"kill_rank": 1, "kill_at_step": 5, "marker": str(marker)}))
        cfg = load_config(ROOT / "configs" / "demo.yaml", [
            "task=length_of_stay", f"data.shards={bucket_shards}", f"trainer.storage_path={s3_bucket}/runs",
            f"tracking.uri={server.uri}", "tracking.experiment=e2e", "data.num_loader_workers=0",
            "data.augment=false", "data.shuffle_buffer=0", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
            "trainer.num_workers=2", "data.batch_size=2", "trainer.max_failures=1",
            "trainer.checkpoint_every_n_steps=2", "trainer.num_to_keep=10"])
        result = run_training(cfg)
    finally:
        ray.shutdown()
    # The worker group was really restarted: rank 1 died at step 5, the 2nd step of epoch 1; the last
    # checkpoint before it is step 4 (mid-epoch), read back from the bucket: the restarted group continues
    # from there, so the run ends with 2 epochs, 6 steps, each epoch once.
    assert marker.read_text().startswith("killed rank 1 at step 5")
    assert result.epochs_completed == 2 and result.global_step == 6
    assert [h["epoch"] for h in result.history] == [0, 1]
    run_dir = result.run_dir
    assert run_dir == storage.resolve(f"{s3_bucket}/runs/{result.run_name}")
    objects = {o.path for o in run_dir.list()}
    assert sorted({p.split("/")[0] for p in objects if p.startswith("checkpoint_s")}) == [
        "checkpoint_s00000002", "checkpoint_s00000003_epoch0000", "checkpoint_s00000004", "checkpoint_s00000006_epoch0001"]
    assert {"run.json", "summary.json", "train.log", f"best/{BEST_POINTER}",
            "checkpoint_s00000004/rng/rank_1.pt", "checkpoint_s00000004/digests/rank_1.json"} <= objects
    assert read_meta(result.last_checkpoint)["epoch"] == 2
    log = (run_dir / "train.log").read_text()  # uploaded a last time at exit: it ends with the registration
    assert log.splitlines()[0].endswith(f"[dipro train] run {result.run_name}: task length_of_stay, ddp, precision "
                                        "fp32, 2 worker(s) on CPU, placement PACK")
    assert "best epoch 1" in log and "[dipro train] registered 1\n" in log
    try:
        client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        exp = client.get_experiment_by_name("e2e")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1 and runs[0].info.run_id == result.mlflow_run_id
        run = runs[0]
        assert run.info.status == "FINISHED"
        p, t, m = run.data.params, run.data.tags, run.data.metrics
        assert (p["workers"], p["strategy"], p["precision"], p["seed"]) == ("2", "ddp", "fp32", str(cfg.seed))
        assert p["effective_batch"] == str(cfg.effective_batch_size) and p["data.shards"] == bucket_shards
        assert t["data.fingerprint"] == data_fingerprint(bucket_shards) == data_fingerprint(shards)
        assert len(t["git.commit"]) == 40 and t["version.ray"] and t["version.deepspeed"] and t["hardware.cpu_count"]
        for key in ("train/total", "train/lr", "train/samples_per_s", "val/accuracy", "test/accuracy",
                    "data/storage_retries", "data/epoch_storage_retries", "data/epoch_cache_hits"):
            assert key in m, key
        assert m["data/epoch_storage_retries"] == 0.0 and m["data/epoch_storage_requests"] > 0  # streamed
        steps = sorted({x.step for x in client.get_metric_history(run.info.run_id, "train/total")})
        assert steps[-1] == result.global_step and len(steps) >= 4
        assert len({x.step for x in client.get_metric_history(run.info.run_id, "val/accuracy")}) == 2  # per epoch
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "summary.json", "eval"} <= arts  # the model is an MLflow 3 LoggedModel of the run
        evals = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run.info.run_id, "eval/test")}
        assert {"roc.png", "pr.png", "confusion.png", "region_attention.png", "metrics.json"} <= evals
        # proxy mode: the figures and the logged model went through the server into the bucket
        stored = {o.path for o in (storage.resolve(s3_bucket) / "mlflow").list()}
        assert any(p.endswith("eval/test/roc.png") for p in stored) and any(p.endswith("/model.pt") for p in stored)
        versions = client.search_model_versions("name = 'dipro-length_of_stay'")
        assert [v.run_id for v in versions] == [run.info.run_id]
        assert versions[0].tags["data.fingerprint"] == t["data.fingerprint"]
        assert versions[0].tags["checkpoint"].startswith(f"{run_dir}/best/")  # the exact best generation
        client.set_registered_model_alias("dipro-length_of_stay", "champion", versions[0].version)

        # evaluate and predict from the bucket checkpoint, outputs on the bucket
        rc = cli.main(["evaluate", "--checkpoint", f"{run_dir}/best", "--split", "test", "--out", f"{s3_bucket}/eval"])
        assert rc == 0, capsys.readouterr().err
        metrics = json.loads(storage.resolve(f"{s3_bucket}/eval/metrics.json").read_text())["metrics"]
        assert metrics["loss"] == pytest.approx(result.metrics["test/loss"], rel=1e-5)
        rc = cli.main(["predict", "--model", f"{run_dir}/best", "--shards", bucket_shards, "--split", "test",
                       "--out", f"{s3_bucket}/preds/best.parquet", "--no-ray"])
        assert rc == 0, capsys.readouterr().err
        from_checkpoint = read_parquet(f"{s3_bucket}/preds/best.parquet")
        # the registered champion, by a client without any bucket credentials: artifacts come from the server
        for name in BUCKET_CREDENTIALS:
            monkeypatch.delenv(name, raising=False)
        rc = cli.main(["predict", "--model", "models:/dipro-length_of_stay@champion", "--shards", str(shards),
                       "--split", "test", "--out", str(tmp_path / "champion.parquet"), "--tracking-uri", server.uri,
                       "--no-ray"])
        assert rc == 0, capsys.readouterr().err
        champion = pd.read_parquet(tmp_path / "champion.parquet")
        assert len(champion) == 6
        # the same predictions; the bucket's rows name the exact shard objects read (the build's generation)
        assert [logical_path(p) for p in from_checkpoint["shard"]] == list(champion["shard"])
        assert all(p != logical_path(p) for p in from_checkpoint["shard"])
        pd.testing.assert_frame_equal(champion, from_checkpoint.assign(shard=champion["shard"]))
    finally:
        server.stop()
