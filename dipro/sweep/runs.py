"""The sweep's MLflow runs: one parent per sweep, one child per trial, found again by tags.

Tags: ``dipro.sweep.name`` (both), ``dipro.sweep.role`` (``parent`` | ``trial``), ``dipro.sweep.trial``
(the trial key) and ``mlflow.parentRunId`` (children).  A resumed sweep searches for them and
reuses every run it finds (:class:`~dipro.tracking.tracker.Tracker` bound to the same run id), so
MLflow shows each trial exactly once however often its driver was restarted; only runs not
found are created, in the driver (several processes creating runs on sqlite lock it).
Ray's ``MLflowLoggerCallback`` is not used: it opens a second run for a resumed trial and leaves
the first one RUNNING.
"""
from __future__ import annotations

from typing import Any

SWEEP_TAG = "dipro.sweep.name"
ROLE_TAG = "dipro.sweep.role"
TRIAL_TAG = "dipro.sweep.trial"


def _client_and_experiment(cfg: Any):
    from mlflow import MlflowClient

    from dipro.tracking.tracker import _get_or_create_experiment
    from dipro.tracking.uri import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    return client, uri, _get_or_create_experiment(client, cfg.tracking.experiment)


def find_runs(cfg: Any, sweep: str) -> dict[str, Any]:
    """{"parent": run, trial key: run} of the sweep's runs that exist (newest first wins)."""
    client, _, experiment_id = _client_and_experiment(cfg)
    runs = client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep}'", max_results=5000,
                              order_by=["attributes.start_time ASC"])
    found: dict[str, Any] = {}
    for run in runs:
        tags = run.data.tags
        key = "parent" if tags.get(ROLE_TAG) == "parent" else tags.get(TRIAL_TAG)
        if key:
            found.setdefault(key, run)
    return found


def attach(cfg: Any, run: Any):
    """A :class:`Tracker` for an existing run (nothing is created)."""
    from dipro.tracking.tracker import Tracker
    from dipro.tracking.uri import resolve_tracking_uri

    fp = run.data.tags.get("data.fingerprint")
    return Tracker(resolve_tracking_uri(cfg), run.info.run_id, run.info.experiment_id,
                   data_fingerprint=fp if fp and "unknown" not in fp else None)


def parent_tracker(cfg: Any, sweep: str, found: dict[str, Any], params: dict[str, Any]):
    """The sweep's parent run (created once, with the sweep's params)."""
    from dipro.tracking.tracker import Tracker

    if "parent" in found:
        tracker = attach(cfg, found["parent"])
        tracker.mark_running()
        return tracker
    tracker = Tracker.create_in_driver(cfg, sweep, extra_tags={SWEEP_TAG: sweep, ROLE_TAG: "parent"})
    tracker.log_params(params)
    return tracker


def trial_tracker(trial_cfg: Any, run_name: str, sweep: str, key: str, parent_run_id: str, found: dict[str, Any],
                  overrides: list[str]):
    """The trial's child run: the one found by tags, else a new one under the parent (``trial_cfg``: the
    trial's config, or the sweep's base config for a trial whose values do not make a config)."""
    from dipro.tracking.tracker import Tracker

    if key in found:
        return attach(trial_cfg, found[key])
    return Tracker.create_in_driver(trial_cfg, run_name, parent_run_id=parent_run_id,
                                    extra_tags={SWEEP_TAG: sweep, ROLE_TAG: "trial", TRIAL_TAG: key,
                                                "dipro.sweep.overrides": " ".join(overrides)})
