"""Batch inference: a registered model (or a checkpoint) over one split of the shards -> Parquet.

    dipro predict --model models:/dipro-mortality@champion --shards S --split test --out preds.parquet

One output row per sample: ``sample_key, subject_id, stay_id, shard``, the
task's probability columns and the predicted class (see
:func:`dipro.tracking.pyfunc.probabilities_frame`).  Rows follow the manifest's
shard order and the order inside each shard.  Corrupt samples are skipped,
counted and reported (never silently dropped).  ``--out`` is a local path
or an ``s3://`` / ``gs://`` URI, written atomically either way (a temporary name
and a rename locally, one PUT on a bucket).  ``--model`` may also be a checkpoint
directory on a bucket (``s3://BUCKET/runs/RUN/best``).

Execution: in-process, or one Ray task per shard (``--ray``, or automatically
when the split holds more than :data:`RAY_MIN_SAMPLES` samples); Ray connects
to ``$RAY_ADDRESS`` or starts a local instance bound to 127.0.0.1.
"""
from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_sharding.errors import UserError
from dipro.defaults import PREDICT_BATCH_SIZE

RAY_MIN_SAMPLES = 20_000
ID_COLUMNS = ("sample_key", "subject_id", "stay_id", "shard")


@dataclass
class PredictReport:
    out: str
    rows: int
    skipped: int
    shards: int
    used_ray: bool
    skipped_examples: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- model loading
def resolve_model(model: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """``(kind, location)``: ("checkpoint", dir or bucket URI) or ("mlflow", local dir of the downloaded model)."""
    from data_sharding import storage

    if storage.is_remote(model):
        from dipro.train.checkpoint import MODEL_FILE, checkpoint_location

        loc = checkpoint_location(model)
        if not (loc / MODEL_FILE).exists():
            raise UserError(f"--model {model}: no {MODEL_FILE} there (expected a checkpoint directory such as "
                            "s3://BUCKET/runs/RUN/best, or a model URI such as models:/dipro-mortality@champion)")
        return "checkpoint", storage.resolve(model).uri
    p = Path(model)
    if p.is_dir() and (p / "model.pt").is_file():
        return "checkpoint", str(p.resolve())
    if p.is_dir() and (p / "MLmodel").is_file():
        return "mlflow", str(p.resolve())
    if "://" not in model and ":/" not in model:
        raise UserError(f"--model {model!r} is neither a checkpoint directory (with model.pt), an MLflow model "
                        "directory (with MLmodel) nor a model URI such as models:/dipro-mortality@champion")
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from dipro.tracking.registry import _tracking_uri
    from dipro.tracking.uri import check_reachable, redact_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(explicit=tracking_uri)
    check_reachable(uri)
    try:
        with _tracking_uri(uri):
            local = mlflow.artifacts.download_artifacts(artifact_uri=model)
    except MlflowException as exc:
        raise UserError(f"cannot load model {model} from tracking server {redact_uri(uri)}: {exc.message}") from None
    return "mlflow", local


def load_model_for_inference(kind: str, location: str, device: str = "cpu") -> tuple[Any, Any]:
    """(network, cfg) from a checkpoint dir or a downloaded DiPro pyfunc model dir."""
    from dipro.tracking.pyfunc import load_network

    if kind == "checkpoint":
        from dipro.train.checkpoint import local_checkpoint

        with local_checkpoint(location, names=("config.yaml", "label_stats.json", "model.pt")) as root:
            return load_network(root / "config.yaml", root / "label_stats.json", root / "model.pt", device)
    arts = Path(location) / "artifacts"
    files = {"config": arts / "config.yaml", "label_stats": arts / "label_stats.json", "weights": arts / "model.pt"}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise UserError(f"{location} is not a DiPro pyfunc model (missing {', '.join(missing)})")
    return load_network(files["config"], files["label_stats"], files["weights"], device)


# ----------------------------------------------------------------------------- one shard
def predict_shard(model: Any, cfg: Any, shard: Any, task_dir: str, crop_size: int | None,
                  batch_size: int, device: str = "cpu") -> tuple[Any, list[str], int]:
    """Predictions of every readable sample of one shard: (DataFrame, skip notes, skipped count)."""
    import pandas as pd

    from dipro.data.decode import CorruptSample, decode_sample
    from dipro.data.plan import Segment
    from dipro.data.reader import Skipped, read_segment
    from dipro.tracking.pyfunc import predict_samples, probabilities_frame

    samples, notes, skipped = [], [], 0
    for raw in read_segment(Segment(shard, 0, shard.samples)):
        if isinstance(raw, Skipped):
            skipped += raw.count
            notes.append(raw.describe())
            continue
        if "__error__" in raw:
            skipped += 1
            notes.append(f"shard {raw['__shard__']} key {raw['__key__']}: {raw['__error__']}")
            continue
        try:
            samples.append(decode_sample(raw, task_dir, crop_size))
        except CorruptSample as exc:
            skipped += 1
            notes.append(f"shard {exc.shard} key {exc.key}: {exc.reason}")
    if not samples:
        return pd.DataFrame(), notes, skipped
    probs = predict_samples(model, cfg, samples, batch_size, device)
    frame = probabilities_frame(cfg.task, probs, [s["sample_key"] for s in samples])
    frame.insert(1, "subject_id", [int(s["subject_id"]) for s in samples])
    frame.insert(2, "stay_id", [int(s["stay_id"]) for s in samples])
    frame.insert(3, "shard", shard.rel)
    return frame, notes, skipped


def _shard_task(kind: str, location: str, model_ref: str, tracking_uri: str | None, shard: Any, task_dir: str,
                crop_size: int | None, batch_size: int, rotation: Any = None) -> tuple[Any, list[str], int]:
    """Ray task body: load the model (downloading it on a node that lacks the driver's copy)."""
    import torch

    from dipro.harmonize.rotation import AcquisitionRemoval

    if kind == "mlflow" and not Path(location).is_dir():
        kind, location = resolve_model(model_ref, tracking_uri)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_model_for_inference(kind, location, device)
    if rotation is not None:  # the driver's loaded rotation travels with the task (no shared disk needed)
        model.feature_edit = AcquisitionRemoval(rotation, device)
    return predict_shard(model, cfg, shard, task_dir, crop_size, batch_size, device)


# ----------------------------------------------------------------------------- driver
def run_predict(model: str, shards: str, split: str, out: str, *, use_ray: bool | None = None,
                batch_size: int = PREDICT_BATCH_SIZE, tracking_uri: str | None = None, progress: bool = True,
                remove_acquisition: str | None = None) -> PredictReport:
    """Predict every sample of ``split`` and write ``out`` atomically (see module doc).

    ``remove_acquisition``: a ``dipro harmonize`` output directory; its technical coordinates are
    projected out of the region features (``DiPro.feature_edit``) in every forward pass."""
    from dipro.harmonize.rotation import attach_removal

    import pandas as pd
    import torch
    from tqdm import tqdm

    from dipro.data.plan import read_manifest

    from data_sharding import storage

    out_loc = storage.resolve(out)
    if not out_loc.name.endswith(".parquet"):
        raise UserError(f"--out {out} must end in .parquet")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    kind, location = resolve_model(model, tracking_uri)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, cfg = load_model_for_inference(kind, location, device)
    rotation = attach_removal(net, remove_acquisition)
    shard_set = read_manifest(shards, cfg.task, split)
    crop_size = shard_set.settings.get("crop_size")
    if crop_size is not None and crop_size != cfg.model.crop_size:
        raise UserError(f"shards under {shards} hold {crop_size} px crops but the model expects "
                        f"{cfg.model.crop_size} px (model.crop_size)")
    if use_ray is None:
        use_ray = shard_set.num_samples > RAY_MIN_SAMPLES and len(shard_set.shards) > 1

    results: list[tuple[Any, list[str], int]] = []
    if use_ray:
        results = _run_ray(kind, location, model, tracking_uri, shard_set, crop_size, batch_size, progress, rotation)
    else:
        for shard in tqdm(shard_set.shards, desc=f"predict {split}", unit="shard", disable=not progress):
            results.append(predict_shard(net, cfg, shard, shard_set.task_dir, crop_size, batch_size, device))

    frames = [f for f, _, _ in results if len(f)]
    notes = [n for _, ns, _ in results for n in ns]
    skipped = sum(k for _, _, k in results)
    if not frames:
        raise UserError(f"no readable sample in the {split} shards under {shards} ({skipped} corrupt)")
    table = pd.concat(frames, ignore_index=True)
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    out_loc.write_bytes(buf.getvalue())  # atomic: temp + rename locally, one PUT on a bucket
    if skipped:
        print(f"dipro predict: skipped {skipped} corrupt sample(s); first: " + "; ".join(notes[:3]), file=sys.stderr)
    return PredictReport(str(out_loc.native), len(table), skipped, len(shard_set.shards), bool(use_ray), notes[:20])


def _run_ray(kind, location, model_ref, tracking_uri, shard_set, crop_size, batch_size, progress, rotation=None):
    import ray
    from tqdm import tqdm

    from data_sharding.ray_init import init_ray

    started = init_ray(log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1)(_shard_task)
        refs = [task.remote(kind, location, model_ref, tracking_uri, shard, shard_set.task_dir, crop_size, batch_size,
                            rotation)
                for shard in shard_set.shards]
        order = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        with tqdm(total=len(refs), desc=f"predict {shard_set.split} (ray)", unit="shard", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    results[order[ref]] = ray.get(ref)
                    bar.update(1)
        return results
    finally:
        if started:
            ray.shutdown()
