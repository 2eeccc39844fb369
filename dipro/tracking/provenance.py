"""What produced a run: flattened config params, git state, data fingerprint, versions, hardware.

All of it is cheap, local and never raises for a missing tool (no git, no GPU):
a value that cannot be found is recorded as ``"unknown"``.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "ray", "deepspeed", "webdataset", "mlflow")
MANIFEST = "manifest.parquet"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"batch_size": 4}}`` -> ``{"data.batch_size": 4}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_params(cfg: Any) -> dict[str, str]:
    """The whole resolved config flattened, plus the run-shape summary params."""
    from dipro.config import to_dict
    from dipro.tracking.uri import redact_config

    params = {k: _param_str(v) for k, v in flatten(redact_config(to_dict(cfg))).items()}
    params.update({
        "seed": str(cfg.seed),
        "strategy": str(cfg.trainer.strategy),
        "workers": str(cfg.trainer.num_workers),
        "precision": str(cfg.trainer.precision),
        "effective_batch": str(cfg.effective_batch_size),
        "effective_lr": repr(float(cfg.effective_lr)),
        "monitor": f"val/{cfg.monitor}",
    })
    return params


def _param_str(v: Any) -> str:
    return "null" if v is None else str(v)


def git_state(cwd: str | os.PathLike | None = None) -> dict[str, str]:
    """``{"git.commit": sha, "git.dirty": "true"|"false"}`` of the repo holding ``cwd`` (or this package)."""
    where = Path(cwd) if cwd is not None else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": sha, "git.dirty": "true" if status.strip() else "false"}


def data_fingerprint(shard_root: str | os.PathLike) -> str | None:
    """sha256 over the shard manifest's (planned path, sha256) rows sorted by path; None if no manifest.

    Two shard sets with the same fingerprint hold byte-identical shards, which is
    what "the same data" means when the registry compares two model versions.  The
    manifest is read through the storage layer (a local directory or a bucket prefix);
    the planned path (``ShardRecord.logical``) leaves out a bucket object's generation, so the
    same shards built locally and on a bucket have the same fingerprint.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_sharding import storage
    from data_sharding.manifest import logical_path

    manifest = storage.resolve(shard_root) / MANIFEST
    try:
        data = manifest.read_bytes()
    except storage.NotFound:
        return None
    table = pq.read_table(pa.BufferReader(data), columns=["path", "sha256"]).to_pydict()
    h = hashlib.sha256()
    for path, sha in sorted((logical_path(p), sha) for p, sha in zip(table["path"], table["sha256"])):
        h.update(f"{path}\t{sha}\n".encode())
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[f"version.{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[f"version.{name}"] = "not installed"
    return out


def hardware() -> dict[str, str]:
    """CPU count and GPU names of *this* process's machine (the driver's, when called there)."""
    gpus = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # a broken CUDA install must not stop tracking
        gpus = "unknown"
    return {"hardware.cpu_count": str(os.cpu_count() or "unknown"), "hardware.gpus": gpus}


def run_tags(cfg: Any) -> dict[str, str]:
    """Every provenance tag of a training run."""
    from data_sharding import storage

    shards = storage.resolve(cfg.data.shards)  # a local path made absolute, or a bucket URI
    fp = data_fingerprint(shards.uri)
    tags = {
        "dipro.task": cfg.task,
        "data.fingerprint": fp or "unknown (no manifest.parquet)",
        "data.manifest": (shards / MANIFEST).uri,
    }
    git = git_state()
    tags.update(git)
    if git["git.commit"] != "unknown":
        tags["mlflow.source.git.commit"] = git["git.commit"]
    tags.update(package_versions())
    tags.update(hardware())
    return tags
