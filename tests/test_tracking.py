"""dipro.tracking against the sqlite default: URI resolution, one run per training run, reattach, figures."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dipro.config import load_config
from data_sharding.errors import UserError
from dipro.tracking import Tracker
from dipro.tracking.uri import check_reachable, resolve_tracking_uri

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    """One sqlite database for the module (creating one runs MLflow's migrations: seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _cfg(tmp_path: Path, db: str, **over: str):
    """The demo config on ``db`` with an experiment of its own (named after the test's tmp dir)."""
    overrides = [f"tracking.uri={db}", f"data.shards={tmp_path}/shards",
                 f"tracking.experiment={tmp_path.name}"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(REPO / "configs" / "demo.yaml", overrides)


def _client(tracker: Tracker):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracker.uri)


def _write_manifest(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([
        {"task": "mortality_los", "split": "train", "path": "mortality_los/train-000000.tar", "sha256": "ab" * 32},
        {"task": "mortality_los", "split": "val", "path": "mortality_los/val-000000.tar", "sha256": "cd" * 32},
    ]), root / "manifest.parquet")


# ----------------------------------------------------------------------------- URI
def test_uri_resolution_order(tmp_path, db, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:1"
    assert resolve_tracking_uri(_cfg(tmp_path, db)) == db  # config beats the environment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/rel.db"  # absolute for Ray workers


def test_unreachable_server_is_a_user_error_naming_the_uri(tmp_path, db):
    import socket

    with socket.socket() as s:  # bound and held but not listening: connections are refused, no one can take it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        uri = f"http://127.0.0.1:{port}"
        with pytest.raises(UserError, match=f"127.0.0.1:{port}"):
            check_reachable(uri, timeout=2)
        with pytest.raises(UserError, match=f"127.0.0.1:{port}"):
            Tracker.create_in_driver(_cfg(tmp_path, db, **{"tracking.uri": uri}), "never")


# ----------------------------------------------------------------------------- one run
def test_tracker_logs_params_tags_metrics_artifacts_into_one_run(tmp_path, db):
    _write_manifest(tmp_path / "shards")
    cfg = _cfg(tmp_path, db, **{"trainer.num_workers": 2, "seed": 29})
    tracker = Tracker.create_in_driver(cfg, "unit-run")
    tracker.log_metrics({"train/loss": 1.5, "train/lr": 1e-3}, step=1)
    tracker.log_metrics({"train/loss": 1.0}, step=2)
    tracker.log_dict({"auprc": 0.5}, "final_metrics.json")
    tracker.finish("FINISHED")

    client = _client(tracker)
    runs = client.search_runs([tracker.experiment_id])
    assert [r.info.run_id for r in runs] == [tracker.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    p, t = run.data.params, run.data.tags
    assert p["seed"] == "29" and p["workers"] == "2" and p["strategy"] == "ddp" and p["precision"] == "fp32"
    assert p["effective_batch"] == str(cfg.effective_batch_size)
    # the optimizer's rate: base_lr x accumulation x 2 workers x micro batch (optim.scale_lr)
    assert float(p["effective_lr"]) == pytest.approx(
        cfg.optim.base_lr * cfg.optim.grad_accum * 2 * cfg.data.batch_size)
    assert p["model.backbone"] == "tiny" and p["trainer.num_workers"] == "2"  # the whole config, flattened
    from dipro.tracking.provenance import data_fingerprint

    assert t["data.fingerprint"] == data_fingerprint(tmp_path / "shards") == tracker.data_fingerprint
    assert t["data.manifest"].endswith("manifest.parquet")
    assert len(t["git.commit"]) == 40 and t["git.dirty"] in ("true", "false")
    for pkg in ("torch", "ray", "deepspeed", "webdataset", "mlflow"):
        assert t[f"version.{pkg}"]
    assert int(t["hardware.cpu_count"]) >= 1 and "hardware.gpus" in t
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 1.0)]
    arts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "final_metrics.json"} <= arts


def test_fingerprint_depends_on_shard_hashes(tmp_path):
    from dipro.tracking.provenance import data_fingerprint

    _write_manifest(tmp_path / "a")
    first = data_fingerprint(tmp_path / "a")
    assert first == data_fingerprint(tmp_path / "a") and len(first) == 64
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"task": "x", "split": "train", "path": "p.tar", "sha256": "ef" * 32}]),
                   tmp_path / "a" / "manifest.parquet")
    assert data_fingerprint(tmp_path / "a") != first
    assert data_fingerprint(tmp_path / "missing") is None


WORKER = """
import pickle, sys
tracker = pickle.load(open(sys.argv[1], "rb"))
tracker.log_metrics({"train/loss": float(sys.argv[2])}, step=int(sys.argv[3]))
assert tracker.flush(60)
"""


def test_reattached_worker_logs_into_the_same_run(tmp_path, db, monkeypatch):
    cfg = _cfg(tmp_path, db)
    tracker = Tracker.create_in_driver(cfg, "driver-run")
    blob = tmp_path / "tracker.pkl"
    blob.write_bytes(pickle.dumps(tracker))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # a worker process unpickles the driver's tracker (as a Ray train worker does) ...
    subprocess.run([sys.executable, str(script), str(blob), "0.9", "1"], check=True, cwd=tmp_path)
    # ... and so does a retried worker group (here: this process, as another "worker")
    retried = pickle.loads(blob.read_bytes())
    retried.log_metrics({"train/loss": 0.8}, step=2)
    monkeypatch.setenv("RANK", "1")  # a non-zero rank is a no-op
    pickle.loads(blob.read_bytes()).log_metrics({"train/loss": 123.0}, step=3)
    monkeypatch.delenv("RANK")
    retried.finish()
    client = _client(tracker)
    assert len(client.search_runs([tracker.experiment_id])) == 1
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (2, 0.8)]


def test_unsent_items_are_saved_and_reported_when_backend_stays_down(tmp_path, db):
    cfg = _cfg(tmp_path, db)
    tracker = Tracker.create_in_driver(cfg, "lost")
    # point the tracker at a backend that cannot work and says so at once: a database whose parent
    # "directory" is a file.  (A directory as the database file would do too, but MLflow retries
    # opening it for ~100 s while holding its store-building lock, stalling every later MlflowClient
    # of this process, e.g. the next test module's.)
    broken = pickle.loads(pickle.dumps(tracker))
    (tmp_path / "not-a-dir").write_text("a file")
    broken.uri = f"sqlite:///{tmp_path}/not-a-dir/mlflow.db"
    broken.retry_interval_s = 0.2
    with pytest.warns(RuntimeWarning) as caught:
        broken.log_metrics({"train/loss": 3.0}, step=7)  # never raises
        broken.finish("FINISHED", timeout=3)
    saved = [str(w.message) for w in caught if "saved under" in str(w.message)]
    assert saved, [str(w.message) for w in caught]
    folder = Path(saved[0].rsplit("saved under ", 1)[1])
    data = json.loads((folder / "unsent.json").read_text())
    assert data["run_id"] == tracker.run_id
    assert data["items"][0]["payload"][0][:2] == ["train/loss", 3.0]


# ----------------------------------------------------------------------------- evaluation figures
def _eval_result(task: str, n: int = 40, seed: int = 0):
    from dipro.train.evaluate import EvalResult

    rng = np.random.default_rng(seed)
    if task == "mortality":
        y_true = rng.integers(0, 2, n)
        y_prob = np.clip(0.3 * y_true + 0.7 * rng.random(n), 0, 1)
        metrics = {"auprc": 0.6, "auroc": 0.7}
    elif task == "length_of_stay":
        y_true = rng.integers(0, 4, n)
        y_prob = rng.dirichlet(np.ones(4), n)
        metrics = {"kappa": 0.1, "accuracy": 0.3, "f1_macro": 0.2, "auroc": 0.55}
    else:
        y_true = rng.integers(0, 4, (n, 7))
        y_true[:, 1] = 3  # a disease never mentioned: its curves are undefined, not an error
        y_prob = rng.dirichlet(np.ones(3), (n, 7))
        metrics = {"f1_macro": 0.3, "auroc": float("nan")}
    att = rng.dirichlet(np.ones(10), n)
    return EvalResult(metrics, y_true, y_prob, [f"k{i}" for i in range(n)], np.arange(n), att, task=task, split="test")


@pytest.mark.parametrize("task", ["mortality", "length_of_stay", "disease_progression"])
def test_log_evaluation_writes_curves_confusion_and_region_attention(tmp_path, db, task):
    cfg = _cfg(tmp_path, db, task=task)
    tracker = Tracker.create_in_driver(cfg, f"eval-{task}")
    tracker.log_evaluation("test", _eval_result(task))
    tracker.finish()
    client = _client(tracker)
    arts = {a.path for a in client.list_artifacts(tracker.run_id, "eval/test")}
    assert arts == {f"eval/test/{n}" for n in ("metrics.json", "roc.png", "pr.png", "confusion.png",
                                               "region_attention.png")}
    local = Path(client.download_artifacts(tracker.run_id, "eval/test/region_attention.png", str(tmp_path)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = client.get_run(tracker.run_id)
    assert "tracking.figures_error.test" not in run.data.tags
    first = next(iter(_eval_result(task).metrics))
    assert f"test/{first}" in run.data.metrics


def test_region_attention_figure_labels_every_region():
    from data_sharding.constants import REGIONS
    from dipro.tracking.figures import region_attention_figure

    att = np.zeros((4, 10))
    att[:, 8] = 1.0  # all attention on the cardiac silhouette
    fig = region_attention_figure(att)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(labels) == sorted(REGIONS)
    widths = {lab: bar.get_width() for lab, bar in zip(labels, ax.patches)}
    assert widths["cardiac silhouette"] == 1.0 and sum(widths.values()) == 1.0
    with pytest.raises(ValueError, match="one per region"):
        region_attention_figure(np.zeros((3, 9)))
