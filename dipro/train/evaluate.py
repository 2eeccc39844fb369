"""Evaluate a model on a split: one code path for validation, ``dipro evaluate``, predict and tracking.

    result = evaluate_checkpoint("runs/RUN/best", "test")
    result.metrics            # dipro.metrics.compute_metrics(...) + "loss"
    result.y_true, result.y_prob, result.sample_keys, result.stay_ids, result.region_attention

Distributed evaluation: each rank predicts its own block of samples (counts may differ
by one), :func:`gather_predictions` collects every rank's arrays on rank 0 with
``all_gather_object`` (no per-batch collective, so unequal counts are fine), drops
duplicates by sample key and orders by key; rank 0 computes the metrics.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from data_sharding.errors import UserError
from dipro.train.data import TASK_LABEL_KEY


@dataclass
class EvalResult:
    """Predictions and metrics of one model on one split (arrays ordered by sample key)."""

    metrics: dict[str, float]
    y_true: np.ndarray
    y_prob: np.ndarray
    sample_keys: list[str]
    stay_ids: np.ndarray
    region_attention: np.ndarray
    task: str = ""
    split: str = ""

    @property
    def num_samples(self) -> int:
        return len(self.sample_keys)


@dataclass
class Predictions:
    """One rank's raw predictions before gathering."""

    y_true: list[np.ndarray] = field(default_factory=list)
    y_prob: list[np.ndarray] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    stay_ids: list[np.ndarray] = field(default_factory=list)
    attention: list[np.ndarray] = field(default_factory=list)
    loss_sum: float = 0.0
    count: int = 0

    def add(self, task: str, batch: dict[str, Any], out: dict[str, torch.Tensor], probs: torch.Tensor,
            loss: torch.Tensor | None) -> None:
        n = len(batch["sample_key"])
        self.y_true.append(batch[TASK_LABEL_KEY[task]].detach().cpu().numpy())
        self.y_prob.append(probs.detach().float().cpu().numpy())
        self.keys.extend(batch["sample_key"])
        self.stay_ids.append(batch["stay_id"].detach().cpu().numpy())
        self.attention.append(out["region_attention"].detach().float().cpu().numpy())
        if loss is not None:
            self.loss_sum += float(loss.detach().float()) * n
        self.count += n

    def arrays(self) -> dict[str, Any]:
        def cat(xs):
            return np.concatenate(xs) if xs else np.zeros((0,))
        return {"y_true": cat(self.y_true), "y_prob": cat(self.y_prob), "keys": list(self.keys),
                "stay_ids": cat(self.stay_ids), "attention": cat(self.attention),
                "loss_sum": self.loss_sum, "count": self.count}


def predict(forward: Callable[[dict[str, Any]], tuple[dict, torch.Tensor | None]],
            predict_proba: Callable[[dict], torch.Tensor], batches: Iterable[dict[str, Any]], task: str,
            device: torch.device, *, lockstep: Callable[[bool], bool] | None = None,
            fallback_batch: dict[str, Any] | None = None, progress: bool = False) -> Predictions:
    """Run ``forward(batch) -> (out, loss)`` over ``batches`` in no-grad mode.

    ``lockstep(has_batch) -> any_rank_has_batch`` (ZeRO-3): every rank keeps calling
    ``forward`` until all ranks ran out of data, repeating its last batch (or
    ``fallback_batch``) with the result discarded, because ZeRO-3 gathers parameters
    inside forward and a rank that stops early would leave the others waiting.
    """
    from dipro.data import move_to_device

    preds = Predictions()
    it = iter(batches)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="evaluate", unit="batch", leave=False)
    last = fallback_batch
    with torch.no_grad():
        while True:
            batch = next(it, None)
            if lockstep is not None:
                if not lockstep(batch is not None):
                    break
                if batch is None:
                    if last is None:
                        raise RuntimeError("a rank with no evaluation batch cannot join ZeRO-3 lockstep forwards")
                    forward(last)
                    continue
            elif batch is None:
                break
            batch = move_to_device(batch, device)
            out, loss = forward(batch)
            preds.add(task, batch, out, predict_proba(out), loss)
            last = batch
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return preds


def gather_predictions(local: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    """Every rank's prediction arrays (a list indexed by rank); unequal counts are fine."""
    if world_size == 1:
        return [local]
    import torch.distributed as dist

    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, local)
    return parts


def finalize(parts: list[dict[str, Any]], task: str, split: str = "") -> EvalResult:
    """Merge rank parts, drop duplicate keys, sort by key, compute the paper's metrics (+ mean loss)."""
    from dipro.metrics import compute_metrics

    keys = [k for p in parts for k in p["keys"]]
    if not keys:
        raise UserError(f"no {split or 'evaluation'} samples for task {task}: nothing to evaluate")
    y_true = np.concatenate([p["y_true"] for p in parts if p["count"]])
    y_prob = np.concatenate([p["y_prob"] for p in parts if p["count"]])
    stay = np.concatenate([p["stay_ids"] for p in parts if p["count"]])
    att = np.concatenate([p["attention"] for p in parts if p["count"]])
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    order = [first[k] for k in sorted(first)]
    count = sum(p["count"] for p in parts)
    metrics = dict(compute_metrics(task, y_true[order], y_prob[order]))
    metrics["loss"] = sum(p["loss_sum"] for p in parts) / count if count else math.nan
    return EvalResult(metrics=metrics, y_true=y_true[order], y_prob=y_prob[order],
                      sample_keys=[keys[i] for i in order], stay_ids=stay[order], region_attention=att[order],
                      task=task, split=split)


def evaluate_model(model: torch.nn.Module, cfg, split: str, *, shard_dir: str | Path | None = None,
                   device: str | torch.device = "cpu", precision: str = "fp32", batch_size: int | None = None,
                   num_workers: int | None = None, progress: bool = False) -> EvalResult:
    """Single-process evaluation of ``model`` (a plain DiPro) on ``split`` of ``shard_dir``."""
    from dipro.train.data import eval_loader
    from dipro.train.precision import autocast

    device = torch.device(device)
    model.to(device).eval()
    loader = eval_loader(cfg, split, rank=0, world_size=1, shard_dir=shard_dir, batch_size=batch_size,
                         num_workers=num_workers)

    def forward(batch):
        with autocast(device, precision):
            out = model(batch)
            loss, _ = model.compute_loss(batch, out)
        return out, loss

    preds = predict(forward, model.predict_proba, loader, cfg.task, device, progress=progress)
    return finalize([preds.arrays()], cfg.task, split)


def evaluate_checkpoint(path: str | Path, split: str, *, remove_acquisition: str | Path | None = None,
                        **kwargs: Any) -> EvalResult:
    """Load a checkpoint (:func:`dipro.train.checkpoint.load_model`: a directory or its s3:// / gs:// URI) and
    evaluate it; ``remove_acquisition``:
    a ``dipro harmonize`` output directory whose technical coordinates are projected out of the region features."""
    from dipro.harmonize.rotation import attach_removal
    from dipro.train.checkpoint import load_model

    model, cfg = load_model(path, device=kwargs.get("device", "cpu"))
    attach_removal(model, remove_acquisition)
    return evaluate_model(model, cfg, split, **kwargs)


@dataclass
class SeedSummary:
    """:func:`evaluate_over_checkpoints`' result."""

    results: dict[str, EvalResult]
    summary: dict[str, tuple[float, float]]
    """metric -> (mean, std) over the checkpoints."""
    table: str
    json_path: Path


def evaluate_over_checkpoints(paths: list[Path], split: str, out_dir: str | Path, **kwargs: Any) -> SeedSummary:
    """Evaluate several checkpoints of one task (e.g. the three seeds' ``dipro import-authors`` outputs) on
    ``split``; write each one's ``metrics.json`` under ``out_dir/<name>/`` and ``summary.json`` /
    ``summary.txt`` (the paper's table: one row per checkpoint, then mean ± std, as ``dipro experiment``)."""
    from data_sharding.atomic import write_text
    from dipro.metrics import aggregate_seeds, format_table
    from dipro.train.checkpoint import load_config_from_checkpoint

    out = Path(out_dir)
    names: list[str] = []
    subdirs: list[str] = []
    tasks = {}
    for i, p in enumerate(paths):
        d = p.parent if p.is_file() else p
        cfg = load_config_from_checkpoint(d)
        tasks[str(p)] = cfg.task
        unique = d.name not in subdirs
        subdirs.append(d.name if unique else f"{d.name}-{i + 1}")
        names.append(f"{subdirs[-1]} (seed {cfg.seed})")
    if len(set(tasks.values())) > 1:
        raise UserError("--checkpoint: the checkpoints are of different tasks ("
                        + ", ".join(f"{p}: {t}" for p, t in tasks.items()) + "); one table is for one task")
    results: dict[str, EvalResult] = {}
    for name, sub, p in zip(names, subdirs, paths):
        results[name] = evaluate_checkpoint(p, split, **kwargs)
        write_eval_outputs(results[name], out / sub, str(p))
    task = next(iter(tasks.values()))
    per = {name: {k: v for k, v in r.metrics.items() if k != "loss"} for name, r in results.items()}
    summary = aggregate_seeds(list(per.values()))
    rows = dict(per)
    rows[f"mean ± std ({len(paths)} checkpoints)"] = summary
    table = f"{task} / {split}\n" + format_table(rows, task)
    jpath = out / "summary.json"
    write_text(jpath, json.dumps({"task": task, "split": split,
                                  "checkpoints": {n: str(p) for n, p in zip(names, paths)},
                                  "metrics": {n: {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                                  for k, v in m.items()} for n, m in per.items()},
                                  "summary": {k: {"mean": v[0], "std": v[1]} for k, v in summary.items()}},
                                 indent=1, default=float))
    write_text(jpath.with_suffix(".txt"), table + "\n")
    return SeedSummary(results=results, summary=summary, table=table, json_path=jpath)


def checkpoint_from_model_uri(uri: str, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """Download an MLflow model (``models:/dipro-mortality@champion``, ``runs:/...``) and return
    the directory inside it that holds ``model.pt`` + ``config.yaml``.

    ``tracking_uri``: the tracking/registry server (default ``$MLFLOW_TRACKING_URI`` or the local
    sqlite); ``dst``: where to download to (default: a fresh temporary directory)."""
    import mlflow

    from dipro.train.checkpoint import CONFIG_FILE, MODEL_FILE

    from dipro.tracking.registry import _tracking_uri
    from dipro.tracking.uri import redact_uri, resolve_tracking_uri

    tracking = resolve_tracking_uri(explicit=tracking_uri)  # credentials out of the URI, into MLflow's environment
    try:
        with _tracking_uri(tracking):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                             dst_path=str(dst) if dst is not None else None))
    except Exception as exc:  # MLflow raises several types for unknown names/aliases/servers
        raise UserError(f"cannot download model {uri!r} from MLflow ({redact_uri(tracking)}): {exc}") from None
    for weights in sorted(local.rglob(MODEL_FILE)):
        if (weights.parent / CONFIG_FILE).is_file():
            return weights.parent
    raise UserError(f"model {uri!r} holds no {MODEL_FILE} next to a {CONFIG_FILE} (not a dipro model?)")


def format_metrics(metrics: dict[str, float], title: str = "") -> str:
    """A two-column table of the headline metrics (per-disease entries after them)."""
    head = [k for k in metrics if "/" not in k]
    rest = [k for k in metrics if "/" in k]
    width = max(len(k) for k in metrics) if metrics else 6
    lines = [title] if title else []
    lines.append(f"{'metric':<{width}}  value")
    lines.append("-" * (width + 8))
    for k in head + rest:
        v = metrics[k]
        lines.append(f"{k:<{width}}  {'undefined' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.4f}'}")
    return "\n".join(lines)


def write_eval_outputs(result: EvalResult, out_dir: str | Path, source: str,
                       intervals: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """``metrics.json`` and ``metrics.txt`` (the table) in ``out_dir`` (a directory or an s3:// / gs:// prefix),
    each written atomically (temp + rename locally, one PUT on a bucket). Returns their locations.

    ``intervals``: :func:`dipro.bootstrap.bootstrap_run` output, saved under ``"intervals"`` and
    printed under the table."""
    from data_sharding import storage

    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    out = storage.resolve(out_dir)
    payload = {"task": result.task, "split": result.split, "source": source, "num_samples": result.num_samples,
               "metrics": {k: clean(v) for k, v in result.metrics.items()}}
    text = format_metrics(result.metrics, f"{result.task} / {result.split} / {source}")
    if intervals:
        from dipro.bootstrap import format_intervals

        payload["intervals"] = {k: {f: clean(x) for f, x in iv.as_dict().items()} for k, iv in intervals.items()}
        text += "\n\n" + format_intervals({source: intervals}, result.task)
    jpath, tpath = out / "metrics.json", out / "metrics.txt"
    jpath.write_text(json.dumps(payload, indent=1))
    tpath.write_text(text + "\n")
    return jpath.native, tpath.native


def save_predictions(path, result: EvalResult) -> None:
    """A result's arrays as one ``.npz`` (no pickle), written atomically (a path or an s3:// / gs:// URI)."""
    import io

    from data_sharding import storage

    buf = io.BytesIO()
    np.savez(buf, y_true=result.y_true, y_prob=result.y_prob, sample_keys=np.asarray(result.sample_keys, dtype=str),
             stay_ids=result.stay_ids, task=np.asarray(result.task), split=np.asarray(result.split),
             metric_names=np.asarray(list(result.metrics), dtype=str),
             metric_values=np.asarray(list(result.metrics.values()), dtype=np.float64))
    storage.resolve(path).write_bytes(buf.getvalue())


def load_predictions(path) -> EvalResult:
    """The :class:`EvalResult` saved by :func:`save_predictions` (region attention is not kept)."""
    import io

    from data_sharding import storage

    p = storage.resolve(path)
    try:
        with np.load(io.BytesIO(p.read_bytes()), allow_pickle=False) as z:
            n = len(z["sample_keys"])
            return EvalResult(metrics=dict(zip(z["metric_names"].tolist(), z["metric_values"].tolist())),
                              y_true=z["y_true"], y_prob=z["y_prob"], sample_keys=z["sample_keys"].tolist(),
                              stay_ids=z["stay_ids"], region_attention=np.zeros((n, 0), np.float32),
                              task=str(z["task"]), split=str(z["split"]))
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"cannot read predictions {p}: {exc}") from None
