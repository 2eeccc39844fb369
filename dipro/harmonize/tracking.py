"""``dipro harmonize`` in MLflow: a run nested under the model's training run.

The parent is the training run that produced the model: a registered version's ``run_id``, a
``runs:/RUN_ID/...`` URI, or for a checkpoint directory ``runs/RUN/best`` the run whose
``mlflow.runName`` is ``RUN`` in the config's ``tracking.experiment``.  The child run
(``mlflow.parentRunId`` = that run) gets the table's values as metrics (``{representation}/{column}``),
the settings as params, and the artifacts ``harmonize/`` (table, JSON, rotation files) and
``harmonize/projection.png`` (the before/after 2-D projection coloured by setting).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from data_sharding.errors import UserError


def find_parent_run(client: Any, cfg: Any, model_ref: str, checkpoint: Path | None) -> str | None:
    """The training run's id, or None when it cannot be found."""
    m = re.match(r"runs:/([0-9a-f]{8,})/", model_ref or "")
    if m:
        return m.group(1)
    if model_ref.startswith("models:/"):
        rest = model_ref[len("models:/"):]
        name, _, ref = rest.partition("@")
        try:
            if ref:
                return client.get_model_version_by_alias(name, ref).run_id
            name, _, version = rest.partition("/")
            return client.get_model_version(name, version).run_id
        except Exception:  # noqa: BLE001 - any lookup failure: no parent
            return None
    if checkpoint is not None:
        run_name = checkpoint.resolve().parent.name if checkpoint.name in ("best",) or checkpoint.name.startswith(
            "checkpoint_") else checkpoint.resolve().name
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{run_name}'", max_results=1,
                                  order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None
    return None


def log_harmonize(result: Any, cfg: Any, model_ref: str, checkpoint: Path | None, tracking_uri: str | None,
                  say=print) -> str:
    """Create the nested run, log the table, figure and rotation; return the run id."""
    from mlflow import MlflowClient

    from dipro.tracking.registry import _tracking_uri
    from dipro.tracking.tracker import _get_or_create_experiment
    from dipro.tracking.uri import check_reachable, redact_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(explicit=tracking_uri)
    check_reachable(uri)
    with _tracking_uri(uri):
        client = MlflowClient(tracking_uri=uri)
        parent = find_parent_run(client, cfg, model_ref, checkpoint)
        if parent is not None:
            experiment_id = client.get_run(parent).info.experiment_id
        else:
            # as dipro train creates it: with a sqlite backend the artifacts go beside the database, not into the cwd
            experiment_id = _get_or_create_experiment(client, cfg.tracking.experiment)
            say(f"no training run found for {model_ref} in {redact_uri(uri)}: the harmonize run is not nested")
        d = result.details
        tags = {"mlflow.runName": f"harmonize-{d['factor']}-{result.counts['split']}", "dipro.harmonize.model": model_ref}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        run = client.create_run(experiment_id, tags=tags)
        rid = run.info.run_id
        try:
            for key, value in {"factor": d["factor"], "k": d["k"], "clusters": d["clusters"], "seed": d["seed"],
                               "split": result.counts["split"], "pairing": result.counts["pairing"],
                               "film_pairs": result.counts["film_pairs"]}.items():
                client.log_param(rid, key, value)
            for rep, row in result.rows.items():
                for col, v in row.items():
                    if v is not None and not (isinstance(v, float) and math.isnan(v)):
                        client.log_metric(rid, f"{rep}/{col}", float(v))
            for name in ("harmonize.txt", "harmonize.json", "rotation.json", "rotation.pt", "projection.png"):
                p = result.out / name
                if p.is_file():
                    client.log_artifact(rid, str(p), "harmonize")
            client.set_terminated(rid, "FINISHED")
        except Exception as exc:
            client.set_terminated(rid, "FAILED")
            raise UserError(f"cannot log the harmonize run to MLflow ({redact_uri(uri)}): {exc}") from None
    return rid
