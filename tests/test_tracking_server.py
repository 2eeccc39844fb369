"""dipro.tracking against a real `mlflow server` on 127.0.0.1 (started and stopped here).

* one run, reattach from a worker, params/metrics over HTTP;
* the server killed mid-run: log_metrics never raises, the gap is reported, and the
  buffered metrics arrive once the server is back (same port, same database);
* `mlflow models serve` of a registered alias answers a dataframe_split request.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import config_path, make_checkpoint
from mlflow_server import MLFLOW, Server, start_http, stop_group

from dipro.config import load_config
from dipro.tracking import Tracker

pytestmark = pytest.mark.slow  # a server start is 10-20 s on 2 cores


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def fast_http(monkeypatch):
    """Few HTTP retries, so a stopped server is noticed in seconds (the defaults back off for minutes)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def _cfg(uri: str, tmp_path: Path, *over: str):
    return load_config(config_path("demo"), [f"tracking.uri={uri}", f"data.shards={tmp_path}/shards",
                                             f"tracking.experiment={tmp_path.name}", *over])


def _wait_for_warning(record: list, pattern: str, timeout: float) -> None:
    """Wait (polling, up to ``timeout`` s) until a warning matching ``pattern`` is in ``record``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(re.search(pattern, str(w.message)) for w in record):
            return
        time.sleep(0.1)
    pytest.fail(f"no warning matching {pattern!r} within {timeout}s; got {[str(w.message) for w in record]}")


def test_one_run_over_http_and_reattach(server, tmp_path):
    from mlflow import MlflowClient

    tracker = Tracker.create_in_driver(_cfg(server.uri, tmp_path, "trainer.num_workers=2"), "http-run")
    worker = pickle.loads(pickle.dumps(tracker))
    worker.log_metrics({"train/loss": 0.5}, step=1)
    worker.log_dict({"x": 1}, "final_metrics.json")
    assert worker.flush(60)
    tracker.finish()
    client = MlflowClient(tracking_uri=server.uri)
    runs = client.search_runs([tracker.experiment_id])
    assert len(runs) == 1 and runs[0].data.params["workers"] == "2"
    assert [m.value for m in client.get_metric_history(tracker.run_id, "train/loss")] == [0.5]
    assert {a.path for a in client.list_artifacts(tracker.run_id)} >= {"config.yaml", "final_metrics.json"}


def test_server_drop_mid_run_keeps_metrics_and_reports_the_gap(server, tmp_path, fast_http):
    from mlflow import MlflowClient

    tracker = Tracker.create_in_driver(_cfg(server.uri, tmp_path), "outage-run", retry_interval_s=0.5)
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    assert tracker.flush(60)
    server.stop()
    with warnings.catch_warnings(record=True) as record:  # the tracker's background thread warns
        warnings.simplefilter("always")
        for step in range(2, 7):
            tracker.log_metrics({"train/loss": 1.0 / step}, step=step)  # never raises while the server is down
        _wait_for_warning(record, "training continues", timeout=120)
        assert not tracker.flush(timeout=1)  # nothing can be sent while the server is down
        assert tracker.pending == 5  # every step kept, none sent
    server.start()  # same port, same database
    with pytest.warns(RuntimeWarning, match="is back"):
        assert tracker.flush(timeout=120)
    tracker.finish()
    client = MlflowClient(tracking_uri=server.uri)
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    run = client.get_run(tracker.run_id)
    gaps = json.loads(run.data.tags["tracking.gaps"])
    assert len(gaps) == 1 and gaps[0]["seconds"] > 0
    assert run.data.metrics["tracking/outage_s"] == pytest.approx(gaps[0]["seconds"])
    assert len(client.search_runs([tracker.experiment_id])) == 1


def test_models_serve_answers_a_dataframe_split_request(server, tmp_path):
    """`mlflow models serve -m models:/dipro-mortality@champion` from the current environment."""
    from dipro.tracking import promote, register_checkpoint
    from dipro.tracking.pyfunc import synthetic_input_example
    from dipro.tracking.predict import load_model_for_inference

    cfg = _cfg(server.uri, tmp_path)
    ckpt = make_checkpoint(tmp_path / "ckpt", cfg, seed=5, val=0.5)
    tracker = Tracker.create_in_driver(cfg, "serve-run")
    tracker.finish()
    version = register_checkpoint(cfg, ckpt, tracker.run_id, {"auprc": 0.5}, "c" * 64)
    promote("mortality", version, "champion", uri=server.uri)

    log = tmp_path / "serve.log"
    argv = lambda port: [MLFLOW, "models", "serve", "-m", "models:/dipro-mortality@champion",  # noqa: E731
                         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    # the scoring server execs `uvicorn` by name: the venv's bin must be on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc, port = start_http(argv, lambda p: f"http://127.0.0.1:{p}/ping", log, None, 180, env=env)
    try:
        frame = synthetic_input_example(32, num_rows=3, seed=11)
        body = json.dumps({"dataframe_split": frame.to_dict(orient="split")}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
    finally:
        stop_group(proc)
    got = pd.DataFrame(answer["predictions"])
    from dipro.tracking.pyfunc import dataframe_to_samples, predict_samples

    model, ckpt_cfg = load_model_for_inference("checkpoint", str(ckpt))
    expected = predict_samples(model, ckpt_cfg, dataframe_to_samples(frame, "mortality", 32))
    assert list(got["sample_key"]) == list(frame["sample_key"])
    np.testing.assert_allclose(got["prob_died"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
