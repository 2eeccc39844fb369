"""A tracking URI with credentials: they reach MLflow, never a printed line, a param or tag,
a saved config.yaml or a Ray runtime env.

The end-to-end test puts an authenticating proxy (Basic auth, 127.0.0.1) in front of a real
`mlflow server`, trains with ``tracking.uri=http://alice:<secret>@127.0.0.1:<proxy>`` and
searches everything the run printed, wrote and logged for the secret.
"""
from __future__ import annotations

import base64
import http.server
import json
import os
import pickle
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from dipro.config import load_config, save_config
from dipro.tracking import provenance
from dipro.tracking.uri import (CREDENTIAL_ENV, check_reachable, probe, redact_uri, resolve_tracking_uri,
                                split_credentials)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "S3CRET-pw-7c1d"
TOKEN = "T0KEN-9f2e"


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch):
    for k in (*CREDENTIAL_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)


def test_split_and_redact():
    assert split_credentials(f"https://alice:{SECRET}@mlflow.example.org:5000/base") == (
        "https://mlflow.example.org:5000/base",
        {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": SECRET})
    assert split_credentials(f"http://127.0.0.1:5000/?token={TOKEN}&team=a") == (
        "http://127.0.0.1:5000/?team=a", {"MLFLOW_TRACKING_TOKEN": TOKEN})
    assert split_credentials("sqlite:////tmp/x.db") == ("sqlite:////tmp/x.db", {})
    assert redact_uri(f"postgresql://mlflow:{SECRET}@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert redact_uri(f"http://h:1/?api_key={SECRET}&a=1") == "http://h:1/?api_key=***&a=1"
    assert redact_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_resolving_moves_credentials_to_mlflows_environment():
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"tracking.uri=https://alice:{SECRET}@mlflow.example.org"])
    assert resolve_tracking_uri(cfg) == "https://mlflow.example.org"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds("https://mlflow.example.org")  # what MLflow's REST client will send
    assert (creds.username, creds.password) == ("alice", SECRET)


def test_saved_config_params_and_pickled_tracker_hold_no_secret(tmp_path):
    from dipro.tracking.tracker import Tracker

    uri = f"https://alice:{SECRET}@mlflow.example.org/?token={TOKEN}"
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"tracking.uri={uri}"])
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert SECRET not in text and TOKEN not in text and "alice" not in text
    assert yaml.safe_load(text)["tracking"]["uri"] == "https://mlflow.example.org/"
    params = provenance.run_params(cfg)
    assert params["tracking.uri"] == "https://mlflow.example.org/"
    assert not any(SECRET in v or TOKEN in v for v in params.values())

    clean = resolve_tracking_uri(cfg)
    tracker = Tracker(clean, "run123", "0")
    assert SECRET not in repr(tracker) and SECRET not in tracker.shown_uri
    blob = pickle.dumps(tracker)  # what Ray hands to the workers (object store, never printed)
    for k in CREDENTIAL_ENV:
        os.environ.pop(k, None)
    worker = pickle.loads(blob)
    assert worker.uri == "https://mlflow.example.org/"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET and os.environ["MLFLOW_TRACKING_TOKEN"] == TOKEN


def test_the_run_claim_records_the_command_line_without_credentials(tmp_path, monkeypatch):
    from dipro.train import rundir

    monkeypatch.setattr(sys, "argv", ["dipro", "train", f"tracking.uri=http://alice:{SECRET}@h:5000/?token={TOKEN}"])
    run_dir = rundir.claim(tmp_path, "r")
    recorded = json.loads((run_dir / "run.json").read_text())["command"]
    assert recorded == "dipro train 'tracking.uri=http://***@h:5000/?token=***'"


class _AuthHealth(http.server.BaseHTTPRequestHandler):
    expected = "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()

    def do_GET(self):  # noqa: N802
        ok = self.headers.get("Authorization") == self.expected
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"no")

    def log_message(self, *args):
        pass


def test_probe_authenticates_and_messages_hold_no_secret():
    from data_sharding.errors import UserError

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert probe(f"http://alice:{SECRET}@127.0.0.1:{port}") is None
        bad = f"http://alice:wrong-{SECRET}@127.0.0.1:{port}"
        reason = probe(bad)
        assert reason == f"GET http://127.0.0.1:{port}/health answered HTTP 401"
        with pytest.raises(UserError) as exc:
            check_reachable(bad)
        assert SECRET not in str(exc.value) and f"127.0.0.1:{port}" in str(exc.value)
    finally:
        server.shutdown()


def test_submit_sh_sends_no_credentials_in_the_runtime_env(tmp_path):
    """cluster/submit.sh builds the job's runtime env; a stand-in `ray` records what it was given."""
    fake = tmp_path / "repo"
    (fake / "cluster").mkdir(parents=True)
    (fake / "cluster" / "submit.sh").write_bytes((ROOT / "cluster" / "submit.sh").read_bytes())
    (fake / "cluster" / "submit.sh").chmod(0o755)
    (fake / "cluster" / "runtime_env.yaml").write_text((ROOT / "cluster" / "runtime_env.yaml").read_text())
    for pkg in ("dipro", "data_sharding"):
        (fake / pkg).symlink_to(ROOT / pkg)
    (fake / ".venv" / "bin").mkdir(parents=True)
    (fake / ".venv" / "bin" / "python").symlink_to(sys.executable)
    record = tmp_path / "ray-args.json"
    (fake / ".venv" / "bin" / "ray").write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    (fake / ".venv" / "bin" / "ray").chmod(0o755)

    def submit(uri: str) -> tuple[dict, str]:
        env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:9", "MLFLOW_TRACKING_URI": uri}
        proc = subprocess.run([str(fake / "cluster" / "submit.sh"), "train", "--config", "configs/demo.yaml"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        args = json.loads(record.read_text())
        return json.loads(args[args.index("--runtime-env-json") + 1]), proc.stdout + proc.stderr

    runtime_env, out = submit(f"https://alice:{SECRET}@mlflow.example.org/?token={TOKEN}")
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "https://mlflow.example.org/"
    assert SECRET not in json.dumps(runtime_env) and TOKEN not in json.dumps(runtime_env)
    assert SECRET not in out and "not sent with the job" in out
    runtime_env, out = submit(f"postgresql://mlflow:{SECRET}@db/mlflow")
    assert "MLFLOW_TRACKING_URI" not in runtime_env["env_vars"] and SECRET not in out
    runtime_env, _ = submit("http://mlflow.internal:5000")
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"


# ----------------------------------------------------------------------------- end to end (slow)

class _Proxy(http.server.BaseHTTPRequestHandler):
    """Forward every request to the MLflow server, only with the right Basic credentials."""

    upstream = ""
    expected = "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()
    refused: list[str] = []
    forwarded: list[str] = []

    def _handle(self):
        if self.headers.get("Authorization") != self.expected:
            type(self).refused.append(f"{self.command} {self.path}")
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization", "connection")}
        req = urllib.request.Request(self.upstream + self.path, data=body, headers=headers, method=self.command)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, data, rh = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            status, data, rh = e.code, e.read(), e.headers
        type(self).forwarded.append(f"{self.command} {self.path.split('?')[0]}")
        self.send_response(status)
        for k in ("Content-Type",):
            if rh.get(k):
                self.send_header(k, rh[k])
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_training_with_credentials_in_the_uri_leaks_them_nowhere(tmp_path):
    from mlflow import MlflowClient

    import processed_fixture
    from mlflow_server import Server

    shards = processed_fixture.make_training_shards(tmp_path / "data")
    server = Server(tmp_path)
    server.start()
    _Proxy.upstream, _Proxy.refused, _Proxy.forwarded = server.uri, [], []
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        port = proxy.server_address[1]
        storage = tmp_path / "runs"
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DIPRO_FAULT_INJECT")}
        env["PYTHONPATH"] = str(ROOT)
        proc = subprocess.run(
            [sys.executable, "-m", "dipro", "train", "--config", str(ROOT / "configs" / "demo.yaml"),
             "task=length_of_stay", f"data.shards={shards}", f"trainer.storage_path={storage}",
             f"tracking.uri=http://alice:{SECRET}@127.0.0.1:{port}", "tracking.register=false",
             "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "trainer.run_name=secret-run",
             "data.num_loader_workers=0"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        printed = proc.stdout + proc.stderr
        assert proc.returncode == 0, printed[-4000:]
        assert SECRET not in printed
        # every file the run wrote (checkpoints' config.yaml, best/, train.log, summary.json, run.json)
        for f in (storage / "secret-run").rglob("*"):
            if f.is_file():
                assert SECRET.encode() not in f.read_bytes(), f
        assert (storage / "secret-run" / "best" / "config.yaml").is_file()

        client = MlflowClient(tracking_uri=server.uri)
        run = client.search_runs([client.get_experiment_by_name("dipro").experiment_id])[0]
        assert run.info.status == "FINISHED"
        assert run.data.params["tracking.uri"] == f"http://127.0.0.1:{port}"
        for value in (*run.data.params.values(), *run.data.tags.values()):
            assert SECRET not in value
        config_artifact = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl")))
        assert SECRET not in config_artifact.read_text()
        # rank 0 logged its step metrics through the proxy: the worker had the credentials
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/lr")] == [1, 2, 3]
        assert _Proxy.refused == [] and any("/api/2.0/mlflow/runs/log-batch" in f for f in _Proxy.forwarded)
    finally:
        proxy.shutdown()
        server.stop()
