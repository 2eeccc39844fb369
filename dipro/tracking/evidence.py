"""The evidence behind a promotion: candidate vs the alias's holder on the same validation samples.

    ev = compare_versions(task, candidate_row, holder_row, uri, shards=None, device="cpu")
    ev.delta        # Interval: candidate - holder on the task's monitor (paired bootstrap, dipro.bootstrap)
    ev.beats(min_delta)   # lower bound of the difference above min_delta

Both registered models are downloaded and evaluated on the ``val`` split of the shards they were
trained on (``--shards``, else the candidate's ``data.shards`` from its config tag), which must
still have the versions' data fingerprint: a paired comparison is only meaningful on the same
samples.  The predictions stay in this process (never logged: they carry stay ids); only the
difference, its interval and the sample count go into the version's tags.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_sharding.errors import UserError
from dipro.bootstrap import RESAMPLES, SEED, Interval

SPLIT = "val"


@dataclass(frozen=True)
class Evidence:
    monitor: str
    """The task's validation monitor without the ``val/`` prefix (auprc, f1_macro, accuracy)."""
    candidate: float
    holder: float
    delta: Interval
    """candidate - holder on the same validation samples, with its paired bootstrap interval."""
    shards: str

    def beats(self, min_delta: float) -> bool:
        return self.delta.excludes(min_delta)

    def describe(self) -> str:
        d = self.delta
        return (f"val/{self.monitor} {self.candidate:.4f} vs {self.holder:.4f}: difference {d.value:+.4f} "
                f"[{d.low:+.4f}, {d.high:+.4f}] (95 % paired bootstrap, {d.resamples} resamples of "
                f"{d.samples} validation samples)")

    def tags(self, prefix: str, min_delta: float) -> dict[str, str]:
        d = self.delta
        return {f"{prefix}.delta": repr(d.value), f"{prefix}.delta_low": repr(d.low),
                f"{prefix}.delta_high": repr(d.high), f"{prefix}.samples": str(d.samples),
                f"{prefix}.resamples": str(d.resamples), f"{prefix}.min_delta": repr(float(min_delta)),
                f"{prefix}.metric": f"val/{self.monitor}"}


def version_shards(row: Any) -> str | None:
    """``data.shards`` of a version's config tag (None if the tag is absent or unreadable)."""
    try:
        return json.loads(row.tags.get("config", "{}"))["data"]["shards"]
    except (ValueError, KeyError, TypeError):
        return None


def compare_versions(task: str, candidate: Any, holder: Any, uri: str, *, shards: str | None = None,
                     device: str = "cpu", n_resamples: int = RESAMPLES, seed: int = SEED,
                     progress: bool = False) -> Evidence:
    """Evaluate both versions (registry rows of :func:`dipro.tracking.registry.list_versions`) on the
    validation split and bootstrap the difference of the monitor (raises UserError naming what is missing)."""
    from dipro.bootstrap import align, bootstrap_paired
    from dipro.config import TASK_MONITOR
    from dipro.tracking.provenance import data_fingerprint
    from dipro.tracking.registry import model_name
    from dipro.train.evaluate import checkpoint_from_model_uri, evaluate_checkpoint

    shard_dir = shards or version_shards(candidate)
    if not shard_dir:
        raise UserError(f"version {candidate.version} records no data.shards in its config tag; pass --shards DIR "
                        "(the shards both versions were trained on)")
    found = data_fingerprint(shard_dir)
    if found is None:
        raise UserError(f"no shards at {shard_dir} (no manifest.parquet) to compare versions {candidate.version} and "
                        f"{holder.version} on; pass --shards DIR (the shards both were trained on)")
    if found != candidate.fingerprint:
        raise UserError(f"the shards at {shard_dir} have data fingerprint {found[:12]}, versions {candidate.version} "
                        f"and {holder.version} were trained on {candidate.fingerprint[:12]}: pass --shards DIR with "
                        "the shards they were trained on")
    monitor = TASK_MONITOR[task]
    results = []
    with tempfile.TemporaryDirectory(prefix="dipro-promote-") as tmp, _quiet_downloads():
        for row in (candidate, holder):
            ckpt = checkpoint_from_model_uri(f"models:/{model_name(task)}/{row.version}", tracking_uri=uri,
                                             dst=Path(tmp) / f"v{row.version}")
            results.append(evaluate_checkpoint(ckpt, SPLIT, shard_dir=shard_dir, device=device, progress=progress))
    cand, hold = results
    align(cand.sample_keys, hold.sample_keys, f"versions {candidate.version} and {holder.version} on {SPLIT}")
    delta = bootstrap_paired(task, cand.y_true, [cand.y_prob], [hold.y_prob], n_resamples=n_resamples, seed=seed,
                             metrics=[monitor])[monitor]
    return Evidence(monitor=monitor, candidate=float(cand.metrics[monitor]), holder=float(hold.metrics[monitor]),
                    delta=delta, shards=str(shard_dir))


@contextlib.contextmanager
def _quiet_downloads():
    """MLflow's per-file download bars off while the two models are fetched (library chatter on stderr)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
