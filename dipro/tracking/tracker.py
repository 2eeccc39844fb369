"""One MLflow run per training run, created in the driver and reattached in the workers.

    tracker = Tracker.create_in_driver(cfg, run_name)    # driver: check URI, create run, params, tags
    ... hand ``tracker`` (picklable: uri + run id) to the Ray train loop ...
    tracker.log_metrics({"train/loss": 0.3}, step)       # rank 0 only (other ranks are no-ops)
    tracker.log_evaluation("test", eval_result)          # curves, confusion, region attention
    tracker.finish("FINISHED")

Only :meth:`Tracker.create_in_driver` creates a run.  An unpickled tracker (a
worker, or a worker group that Ray restarted after a failure) logs into the
same run id, so a retried group never makes a second run.

Resilience: everything logged after creation goes through an ordered outbox
that a background thread sends with ``MlflowClient.log_batch`` /
``log_artifact``.  The training loop never waits on the network and never sees
a tracking exception.  When sending fails (server down, sqlite locked) the
outbox keeps the data, the thread probes the server every
``retry_interval_s`` and resends when it is back; each outage is recorded as
a gap (warning, ``tracking.gaps`` tag, ``tracking/outage_s`` metric).  Data
still unsent at :meth:`finish` is written to a local JSON file whose path is
reported.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dipro.tracking import provenance
from dipro.tracking.uri import (apply_credentials, check_reachable, current_credentials, is_http, probe,
                               redact_config, redact_uri, resolve_tracking_uri)

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100


@dataclass
class _Op:
    """One outbox entry: ``kind`` in metrics | params | tags | status | artifact."""
    kind: str
    payload: Any


class Tracker:
    """Rank-0 MLflow logger bound to one run id (see module docstring)."""

    def __init__(self, uri: str, run_id: str, experiment_id: str, *,
                 flush_interval_s: float = 2.0, retry_interval_s: float = 10.0,
                 data_fingerprint: str | None = None) -> None:
        self.uri = uri
        """The URI MLflow is called with (an http(s) one holds no credentials: see dipro.tracking.uri)."""
        self.shown_uri = redact_uri(uri)
        """The URI in messages and files."""
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.data_fingerprint = data_fingerprint
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self._init_runtime()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create_in_driver(cls, cfg: Any, run_name: str, *, parent_run_id: str | None = None,
                         extra_tags: dict[str, str] | None = None, **kwargs: Any) -> "Tracker":
        """Resolve the URI, fail fast if unreachable, create experiment + run, log params and tags.

        Raises :class:`~data_sharding.errors.UserError` naming the URI when the server cannot be reached.
        ``parent_run_id`` nests this run under an experiment (per-seed) parent run.
        """
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        uri = resolve_tracking_uri(cfg)
        check_reachable(uri)
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _get_or_create_experiment(client, cfg.tracking.experiment)
        tags = provenance.run_tags(cfg)
        tags["mlflow.runName"] = run_name
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        tags.update(extra_tags or {})
        run = client.create_run(experiment_id, run_name=run_name)
        run_id = run.info.run_id
        params = provenance.run_params(cfg)
        items = sorted(params.items())
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + MAX_PARAMS_PER_BATCH]])
        tag_items = sorted(tags.items())
        for i in range(0, len(tag_items), MAX_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tag_items[i:i + MAX_TAGS_PER_BATCH]])
        fp = tags.get("data.fingerprint")
        tracker = cls(uri, run_id, experiment_id, data_fingerprint=fp if fp and "unknown" not in fp else None,
                      **kwargs)
        tracker.log_dict(redact_config(_config_dict(cfg)), "config.yaml")
        tracker.flush()
        log.info("MLflow run %s (%s) in experiment %s at %s", run_id, run_name, cfg.tracking.experiment,
                 tracker.shown_uri)
        return tracker

    # Pickling carries only the identity of the run (and the credentials MLflow reads from the
    # environment, so a worker on another node can log too): a worker re-opens its own client.
    def __getstate__(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in ("uri", "shown_uri", "run_id", "experiment_id", "data_fingerprint",
                                               "flush_interval_s", "retry_interval_s")}
        state["credentials"] = current_credentials() if is_http(self.uri) else {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        apply_credentials(state.pop("credentials", {}) or {})
        state.setdefault("shown_uri", redact_uri(state["uri"]))
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return f"Tracker(uri={self.shown_uri!r}, run_id={self.run_id!r})"

    def _init_runtime(self) -> None:
        self._lock = threading.Condition()
        self._outbox: list[_Op] = []
        self._thread: threading.Thread | None = None
        self._client = None
        self._stop = False
        self._sending = False
        self._outage_start: float | None = None
        self._outage_reason = ""
        self.gaps: list[dict[str, Any]] = []
        self._staging = None  # local dir holding artifacts until they are sent
        self._system = None  # MLflow's SystemMetricsMonitor while it samples (start_system_metrics)

    # ------------------------------------------------------------------ rank
    @property
    def active(self) -> bool:
        """False on Ray Train / torch ranks other than 0: their calls are no-ops."""
        return os.environ.get("RANK", "0") == "0"

    # ------------------------------------------------------------------ public logging API
    def log_params(self, params: dict[str, Any]) -> None:
        """Extra params (flattened); values are strings in MLflow."""
        if not self.active or not params:
            return
        flat = provenance.flatten(params)
        self._submit(_Op("params", {k: "null" if v is None else str(v) for k, v in flat.items()}))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active or not tags:
            return
        self._submit(_Op("tags", {k: str(v) for k, v in tags.items()}))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric values at ``step``; returns at once and never raises for tracking failures."""
        if not self.active or not metrics:
            return
        ts = int(time.time() * 1000)
        values = []
        for k, v in metrics.items():
            try:
                values.append((str(k), float(v), ts, int(step)))
            except (TypeError, ValueError):
                log.warning("tracking: metric %r has non-numeric value %r; not logged", k, v)
        if values:
            self._submit(_Op("metrics", values))

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """A dict as JSON or YAML (by extension) artifact."""
        if not self.active:
            return
        path = self._stage_path(artifact_file)
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            path.write_text(yaml.safe_dump(obj, sort_keys=False))
        else:
            path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
        self._submit(_Op("artifact", (str(path), _dirname(artifact_file))))

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.active:
            return
        path = self._stage_path(artifact_file)
        path.write_text(text)
        self._submit(_Op("artifact", (str(path), _dirname(artifact_file))))

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file or directory into the staging area now, upload it in the background."""
        if not self.active:
            return
        src = Path(local_path)
        dest = self._stage_path(((artifact_path + "/") if artifact_path else "") + src.name)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
        self._submit(_Op("artifact", (str(dest), artifact_path)))

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        """Save a matplotlib figure as PNG (Agg) and close it."""
        if not self.active:
            return
        import matplotlib.pyplot as plt

        path = self._stage_path(artifact_file)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        self._submit(_Op("artifact", (str(path), _dirname(artifact_file))))

    def log_evaluation(self, split: str, result: Any) -> None:
        """Metrics (``{split}/{name}``), ``eval/{split}/metrics.json``, ROC/PR curves, confusion
        matrices and the region-attention figure of an ``EvalResult``.

        Only aggregates are logged: per-sample predictions carry patient ids and stay out of
        a shared registry (MIMIC data use agreement).
        """
        if not self.active:
            return
        from dipro.tracking import figures

        task = _result_task(result)
        metrics = {k: float(v) for k, v in dict(result.metrics).items()}
        self.log_metrics({f"{split}/{k}": v for k, v in metrics.items()}, step=0)
        self.log_dict(metrics, f"eval/{split}/metrics.json")
        try:
            for name, fig in figures.evaluation_figures(task, result.y_true, result.y_prob,
                                                        getattr(result, "region_attention", None),
                                                        title=f"{task} ({split})").items():
                self.log_figure(fig, f"eval/{split}/{name}.png")
        except Exception as exc:  # a plotting problem must not lose a finished training run
            log.warning("tracking: figures for split %s failed: %s", split, exc)
            self.set_tags({f"tracking.figures_error.{split}": str(exc)[:500]})

    def mark_running(self) -> None:
        """Set the run's status back to RUNNING: a sweep trial restarted after its driver died (the run was
        left RUNNING, or FAILED by an earlier attempt) continues in the same run, never a second one."""
        if self.active:
            self._submit(_Op("status", "RUNNING"))  # through the outbox: never blocks, sent in order

    # ------------------------------------------------------------------ system metrics
    def start_system_metrics(self, interval_s: float = 10.0, node: str | None = None) -> bool:
        """Start MLflow's system-metrics sampler for this run (rank 0 only; ``system/...`` metrics:
        CPU, memory, disk, network, and GPU utilisation / memory through nvidia-ml-py when a GPU is
        visible). A restarted group continues the run's step axis. False when it could not start."""
        if not self.active or getattr(self, "_system", None) is not None:
            return False
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, samples_before_logging=1,
                                                resume_logging=True, node_id=node, tracking_uri=self.uri)
            self._system.start()
        except Exception as exc:  # tracking must never be why a run fails
            log.warning("tracking: system metrics could not start: %s", exc)
            self._system = None
            return False
        return True

    def stop_system_metrics(self) -> None:
        system, self._system = getattr(self, "_system", None), None
        if system is not None:
            try:
                system.finish()
            except Exception as exc:
                log.warning("tracking: system metrics did not stop cleanly: %s", exc)

    # ------------------------------------------------------------------ flushing
    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until the outbox is empty (True) or ``timeout`` passes (False); never raises."""
        if not self.active:
            return True
        self._ensure_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._lock.notify_all()
            while self._outbox or self._sending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(timeout=min(0.2, remaining) if remaining is not None else 0.2)
        return True

    def finish(self, status: str = "FINISHED", timeout: float = 120.0) -> None:
        """Flush, report gaps, mark the run terminated; unsent data is saved locally and reported."""
        if not self.active:
            return
        self.stop_system_metrics()
        if self.gaps:
            self.set_tags({"tracking.gaps": json.dumps(self.gaps)})
        ok = self.flush(timeout)
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if not ok:
            self._save_unsent()
            return
        try:
            self._get_client().set_terminated(self.run_id, status=status)
        except Exception as exc:
            warnings.warn(f"tracking: could not mark run {self.run_id} {status} at {self.shown_uri}: {exc}",
                          stacklevel=2)
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    @property
    def pending(self) -> int:
        """Outbox entries not yet sent."""
        with self._lock:
            return len(self._outbox)

    # ------------------------------------------------------------------ internals
    def _get_client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _stage_path(self, artifact_file: str) -> Path:
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix=f"dipro-track-{self.run_id[:8]}-"))
        # one sub-directory per staged item keeps same-named files apart until upload
        slot = Path(tempfile.mkdtemp(dir=self._staging))
        path = slot / Path(artifact_file).name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _submit(self, op: _Op) -> None:
        with self._lock:
            self._outbox.append(op)
            self._lock.notify_all()
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._run, name=f"dipro-tracker-{self.run_id[:8]}",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._outbox:
                    if self._stop:
                        return
                    self._lock.wait(timeout=self.flush_interval_s)
                    continue
                in_outage = self._outage_start is not None
                if in_outage and self._stop:
                    return  # finish() gave up waiting and saved the outbox locally
            if in_outage and not self._server_back():
                with self._lock:
                    self._lock.wait(timeout=self.retry_interval_s)
                continue
            self._send_pending()

    def _server_back(self) -> bool:
        return probe(self.uri, timeout=2.0) is None if is_http(self.uri) else True

    def _send_pending(self) -> None:
        """Send the outbox in order; on the first failure keep the rest and enter an outage."""
        with self._lock:
            ops = list(self._outbox)
            self._sending = True
        sent = 0
        try:
            for batch in _coalesce(ops):
                self._send(batch)
                sent += batch.count
        except Exception as exc:
            with self._lock:
                del self._outbox[:sent]
                self._sending = False
                self._lock.notify_all()
            self._enter_outage(exc)
            return
        with self._lock:
            del self._outbox[:sent]
            if self._outage_start is not None:
                self._end_outage()  # queues the gap report before flush() can see an empty outbox
            self._sending = False
            self._lock.notify_all()

    def _send(self, batch: "_Batch") -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self._get_client()
        if batch.kind == "metrics":
            for i in range(0, len(batch.values), MAX_METRICS_PER_BATCH):
                chunk = batch.values[i:i + MAX_METRICS_PER_BATCH]
                client.log_batch(self.run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in chunk],
                                 synchronous=True)
        elif batch.kind == "params":
            items = list(batch.values.items())
            for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + MAX_PARAMS_PER_BATCH]],
                                 synchronous=True)
        elif batch.kind == "tags":
            items = list(batch.values.items())
            for i in range(0, len(items), MAX_TAGS_PER_BATCH):
                client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in items[i:i + MAX_TAGS_PER_BATCH]],
                                 synchronous=True)
        elif batch.kind == "status":
            client.update_run(self.run_id, status=batch.values)
        else:
            local, artifact_path = batch.values
            if Path(local).is_dir():
                client.log_artifacts(self.run_id, local, artifact_path=(artifact_path + "/" if artifact_path else "")
                                     + Path(local).name)
            else:
                client.log_artifact(self.run_id, local, artifact_path=artifact_path)

    def _enter_outage(self, exc: Exception) -> None:
        if self._outage_start is None:
            self._outage_start = time.time()
            self._outage_reason = f"{type(exc).__name__}: {str(exc)[:200]}"
            warnings.warn(f"tracking: MLflow at {self.shown_uri} failed ({self._outage_reason}); training "
                          f"continues, {self.pending} pending item(s) kept and retried every "
                          f"{self.retry_interval_s:.0f}s", RuntimeWarning, stacklevel=2)
            log.warning("tracking outage started at %s: %s", self.shown_uri, self._outage_reason)

    def _end_outage(self) -> None:
        start, end = self._outage_start, time.time()
        self._outage_start = None
        gap = {"start": round(start, 3), "end": round(end, 3), "seconds": round(end - start, 3),
               "reason": self._outage_reason}
        self.gaps.append(gap)
        warnings.warn(f"tracking: MLflow at {self.shown_uri} is back after {gap['seconds']:.1f}s; buffered "
                      "data sent (gap recorded in tag tracking.gaps)", RuntimeWarning, stacklevel=2)
        total = sum(g["seconds"] for g in self.gaps)
        # caller holds self._lock
        self._outbox.append(_Op("tags", {"tracking.gaps": json.dumps(self.gaps)}))
        self._outbox.append(_Op("metrics", [("tracking/outage_s", total, int(end * 1000), len(self.gaps))]))

    def _save_unsent(self) -> None:
        """Outbox still full at finish: keep it on local disk and say where."""
        with self._lock:
            ops = list(self._outbox)
        out = Path(tempfile.mkdtemp(prefix=f"dipro-unsent-{self.run_id[:8]}-"))
        records = []
        for op in ops:
            if op.kind == "artifact":
                local, artifact_path = op.payload
                dest = out / "artifacts" / (artifact_path or "")
                dest.mkdir(parents=True, exist_ok=True)
                if Path(local).exists():
                    (shutil.copytree if Path(local).is_dir() else shutil.copy2)(local, dest / Path(local).name)
                records.append({"kind": "artifact", "artifact_path": artifact_path, "file": Path(local).name})
            else:
                records.append({"kind": op.kind, "payload": op.payload})
        (out / "unsent.json").write_text(json.dumps({"uri": self.shown_uri, "run_id": self.run_id,
                                                     "gaps": self.gaps, "items": records}, indent=1))
        warnings.warn(f"tracking: {len(ops)} item(s) could not be sent to {self.shown_uri} for run {self.run_id}; "
                      f"saved under {out}", RuntimeWarning, stacklevel=3)


@dataclass
class _Batch:
    kind: str
    values: Any
    count: int


def _coalesce(ops: list[_Op]) -> list[_Batch]:
    """Merge runs of consecutive metric / param / tag ops into one batch each (order kept)."""
    out: list[_Batch] = []
    for op in ops:
        if out and op.kind == out[-1].kind and op.kind in ("metrics", "params", "tags"):
            last = out[-1]
            if op.kind == "metrics":
                last.values = last.values + op.payload
            else:
                last.values = {**last.values, **op.payload}
            last.count += 1
        else:
            values = list(op.payload) if op.kind == "metrics" else (
                dict(op.payload) if op.kind in ("params", "tags") else op.payload)
            out.append(_Batch(op.kind, values, 1))
    return out


def system_metrics_wanted(cfg: Any, uri: str) -> bool:
    """``tracking.system_metrics``, where None means: on for a remote (http/https) tracking server."""
    chosen = getattr(cfg.tracking, "system_metrics", None)
    return is_http(uri) if chosen is None else bool(chosen)


def _get_or_create_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(client.tracking_uri))
    except Exception:  # created concurrently by another driver
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _artifact_location(uri: str) -> str | None:
    """sqlite backend: artifacts beside the database (not in whichever cwd created the experiment)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    return None  # a server decides (its --artifacts-destination)


def _config_dict(cfg: Any) -> dict[str, Any]:
    from dipro.config import to_dict

    return to_dict(cfg)


def _dirname(artifact_file: str) -> str | None:
    parent = str(Path(artifact_file).parent)
    return None if parent in ("", ".") else parent


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)


def _result_task(result: Any) -> str:
    task = getattr(result, "task", None)
    if task:
        return task
    import numpy as np

    y_prob = np.asarray(result.y_prob)
    if y_prob.ndim == 3:
        return "disease_progression"
    if y_prob.ndim == 2:
        return "length_of_stay"
    return "mortality"
